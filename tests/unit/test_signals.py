"""Signal generators at chosen times, and their encoding into register words."""

from __future__ import annotations

import random
import statistics
import struct

import pytest

from firmware_sim.signals import Constant, LiveRegister, Ramp, RegisterType, Sine, encode


def test_constant_ignores_time() -> None:
    signal = Constant(21.5)
    assert [signal(t) for t in (0.0, 1.0, 1e6)] == [21.5, 21.5, 21.5]


def test_ramp_without_bounds_grows_forever() -> None:
    signal = Ramp(start=100.0, slope=2.5)
    assert signal(0) == 100.0
    assert signal(4) == 110.0
    assert signal(1000) == 2600.0


def test_ramp_wraps_from_max_to_min() -> None:
    signal = Ramp(start=20.0, slope=0.5, low=20.0, high=90.0)
    assert signal(0) == 20.0
    assert signal(100) == 70.0
    assert signal(139) == 89.5
    assert signal(140) == 20.0  # reaching max is already the wrap
    assert signal(150) == 25.0
    assert signal(140 * 3 + 2) == 21.0  # third lap


def test_falling_ramp_wraps_from_min_to_max() -> None:
    signal = Ramp(start=5.0, slope=-1.0, low=0.0, high=10.0)
    assert signal(5) == 0.0
    assert signal(6) == 9.0


def test_sine_follows_period_and_offset() -> None:
    signal = Sine(offset=10.0, amplitude=2.0, period=4.0)
    assert signal(0) == pytest.approx(10.0)
    assert signal(1) == pytest.approx(12.0)
    assert signal(3) == pytest.approx(8.0)
    assert signal(4) == pytest.approx(10.0, abs=1e-12)


def test_sine_phase_shifts_time_in_seconds() -> None:
    signal = Sine(offset=0.0, amplitude=1.0, period=60.0, phase=15.0)
    assert signal(0) == pytest.approx(1.0)  # a quarter period ahead: at the peak
    assert signal(15) == pytest.approx(0.0, abs=1e-12)


def test_seeded_noise_is_reproducible() -> None:
    def samples(seed: int) -> list[float]:
        signal = Sine(offset=50.0, amplitude=0.0, period=1.0, noise=0.5, rng=random.Random(seed))
        return [signal(0.0) for _ in range(2000)]

    first, again, other = samples(7), samples(7), samples(8)
    assert first == again
    assert first != other
    # Gaussian around the sine, with the configured standard deviation.
    assert statistics.fmean(first) == pytest.approx(50.0, abs=0.05)
    assert statistics.stdev(first) == pytest.approx(0.5, rel=0.1)


def test_no_noise_means_exact_values() -> None:
    signal = Sine(offset=1.0, amplitude=0.0, period=1.0)
    assert {signal(t / 10) for t in range(20)} == {1.0}


# --- encoding ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "type_", "scale", "words"),
    [
        (1234, "uint16", 1.0, [1234]),
        (65535, "uint16", 1.0, [0xFFFF]),
        (-1, "int16", 1.0, [0xFFFF]),
        (-2, "int16", 1.0, [0xFFFE]),
        (-32768, "int16", 1.0, [0x8000]),
        (0x12345678, "uint32", 1.0, [0x1234, 0x5678]),
        (-2, "int32", 1.0, [0xFFFF, 0xFFFE]),
        (1.5, "float32", 1.0, [0x3FC0, 0x0000]),
        (-2.0, "float32", 1.0, [0xC000, 0x0000]),
        # scale: raw = value / scale
        (1.5, "int16", 0.01, [150]),
        (-12.34, "int16", 0.01, [(-1234) & 0xFFFF]),
        (230.4, "uint16", 0.1, [2304]),
        (3.0, "float32", 2.0, [0x3FC0, 0x0000]),
        (120000, "uint32", 10.0, [0x0000, 12000]),
    ],
)
def test_encode(value: float, type_: RegisterType, scale: float, words: list[int]) -> None:
    assert encode(value, type_, scale) == words


@pytest.mark.parametrize(
    ("value", "expected"),
    [(2.5, 3), (3.5, 4), (-2.5, -3), (2.4999, 2), (-0.4, 0), (0.5, 1)],
)
def test_integer_types_round_half_away_from_zero(value: float, expected: int) -> None:
    (raw,) = struct.unpack(">h", struct.pack(">H", *encode(value, "int16")))
    assert raw == expected


@pytest.mark.parametrize(
    ("value", "type_", "words"),
    [
        (70000, "uint16", [0xFFFF]),
        (-5, "uint16", [0]),
        (40000, "int16", [0x7FFF]),
        (-40000, "int16", [0x8000]),
        (2**33, "uint32", [0xFFFF, 0xFFFF]),
        (-1, "uint32", [0, 0]),
        (2**31, "int32", [0x7FFF, 0xFFFF]),
        (-(2**31) - 1, "int32", [0x8000, 0x0000]),
        (1e39, "float32", [0x7F7F, 0xFFFF]),  # largest finite float32, not an overflow error
        (-1e39, "float32", [0xFF7F, 0xFFFF]),
    ],
)
def test_out_of_range_values_clamp(value: float, type_: RegisterType, words: list[int]) -> None:
    assert encode(value, type_) == words


def test_scale_applies_before_clamping() -> None:
    assert encode(400.0, "int16", 0.01) == [0x7FFF]  # 40000 raw does not fit an int16


def test_live_register_words_follow_signal_until_written() -> None:
    reg = LiveRegister(address=4, table="holding", type="float32", scale=1.0, signal=Ramp(0.0, 1.0))
    assert (reg.width, reg.end) == (2, 5)
    assert reg.words(2.0) == [0x4000, 0x0000]
    reg.written = [0x4120, 0x0000]  # 10.0
    assert reg.words(2.0) == reg.words(99.0) == [0x4120, 0x0000]

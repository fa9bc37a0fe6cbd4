"""The simulator's new signals, its request handling and its RTU framing, without I/O."""

from __future__ import annotations

import itertools
import random
import statistics

import pytest

from firmware_sim.memory import UnitMemory
from firmware_sim.protocol import RtuParser, answer, crc16, rtu_frame
from firmware_sim.signals import Constant, LiveRegister, RandomWalk, Step

# --- step and random walk ----------------------------------------------------------------


def test_step_holds_each_value_and_cycles() -> None:
    signal = Step(values=(1.0, 5.0, 2.0), holds=(1.0, 2.0, 0.5))
    assert [signal(t) for t in (0, 0.99, 1.0, 2.9, 3.0, 3.49, 3.5, 4.5)] == [1, 1, 5, 5, 2, 2, 1, 5]


def test_square_wave_is_a_two_value_step() -> None:
    signal = Step(values=(0.0, 1.0), holds=(5.0, 5.0))
    assert [signal(t) for t in (0, 4.9, 5, 9.9, 10)] == [0, 0, 1, 1, 0]


def test_random_walk_is_seeded_and_starts_at_start() -> None:
    def walk(seed: int) -> list[float]:
        signal = RandomWalk(start=50.0, step=1.0, per_second=False, rng=random.Random(seed))
        return [signal(0.0) for _ in range(500)]

    first, again, other = walk(1), walk(1), walk(2)
    assert first[0] == 50.0
    assert first == again
    assert first != other
    steps = [b - a for a, b in itertools.pairwise(first)]
    assert statistics.stdev(steps) == pytest.approx(1.0, rel=0.15)


def test_random_walk_per_second_scales_with_elapsed_time() -> None:
    signal = RandomWalk(start=0.0, step=2.0, per_second=True, rng=random.Random(3))
    signal(0.0)
    assert signal(0.0) == 0.0  # no time passed: no step
    steps = []
    previous = 0.0
    for i in range(1, 2001):
        value = signal(i * 4.0)
        steps.append(value - previous)
        previous = value
    # 4 s between samples: standard deviation 2 * sqrt(4) = 4
    assert statistics.stdev(steps) == pytest.approx(4.0, rel=0.1)


def test_random_walk_reflects_into_its_bounds() -> None:
    signal = RandomWalk(start=0.5, step=3.0, per_second=False, low=0.0, high=1.0, rng=random.Random(5))
    assert all(0.0 <= signal(0.0) <= 1.0 for _ in range(2000))


# --- requests against a unit --------------------------------------------------------------


def unit() -> UnitMemory:
    return UnitMemory(
        [
            LiveRegister(0, "holding", "uint16", 1.0, Constant(7)),
            LiveRegister(1, "holding", "bool", 1.0, Constant(1), bit=0),
            LiveRegister(1, "holding", "bool", 1.0, Constant(0), bit=3),
            LiveRegister(1, "holding", "bool", 1.0, Constant(1), bit=15),
            LiveRegister(0, "coil", "bool", 1.0, Constant(1)),
            LiveRegister(1, "coil", "bool", 1.0, Constant(0)),
            LiveRegister(2, "coil", "bool", 1.0, Constant(1)),
            LiveRegister(5, "discrete_input", "bool", 1.0, Constant(1)),
        ]
    )


def test_bools_share_a_register_word() -> None:
    assert answer(unit(), bytes.fromhex("03 0000 0002"), 0).pdu == bytes.fromhex("03 04 0007 8001")


def test_writing_a_word_of_bools_sets_each_bit() -> None:
    memory = unit()
    assert answer(memory, bytes.fromhex("06 0001 0008"), 0).pdu == bytes.fromhex("06 0001 0008")
    assert answer(memory, bytes.fromhex("03 0001 0001"), 0).pdu == bytes.fromhex("03 02 0008")


def test_coils_pack_lowest_address_in_lowest_bit() -> None:
    memory = unit()
    assert answer(memory, bytes.fromhex("01 0000 0003"), 0).pdu == bytes.fromhex("01 01 05")
    assert answer(memory, bytes.fromhex("02 0005 0001"), 0).pdu == bytes.fromhex("02 01 01")
    assert answer(memory, bytes.fromhex("05 0001 FF00"), 0).pdu == bytes.fromhex("05 0001 FF00")
    assert answer(memory, bytes.fromhex("0F 0000 0003 01 02"), 0).pdu == bytes.fromhex("0F 0000 0003")
    assert answer(memory, bytes.fromhex("01 0000 0003"), 0).pdu == bytes.fromhex("01 01 02")


@pytest.mark.parametrize(
    ("request_hex", "reply_hex"),
    [
        ("01 0003 0001", "81 02"),  # a gap
        ("02 0000 0001", "82 02"),  # the discrete input table is another table
        ("03 0000 007E", "83 03"),  # more than 125 registers
        ("05 0000 1234", "85 03"),  # a coil is FF00 or 0000
        ("10 0000 0001 04 0001 0002", "90 03"),  # byte count does not match
        ("2B 0E 01 00", "AB 01"),  # function not implemented
        ("03 00", "83 03"),  # too short
    ],
)
def test_refused_requests(request_hex: str, reply_hex: str) -> None:
    assert answer(unit(), bytes.fromhex(request_hex), 0).pdu == bytes.fromhex(reply_hex)


def test_mask_write_and_read_write() -> None:
    memory = unit()
    # (7 AND 0x00F2) OR (0x0025 AND NOT 0x00F2) = 0x0002 OR 0x0005 = 0x0007
    assert answer(memory, bytes.fromhex("16 0000 00F2 0025"), 0).pdu == bytes.fromhex("16 0000 00F2 0025")
    assert answer(memory, bytes.fromhex("03 0000 0001"), 0).pdu == bytes.fromhex("03 02 0007")
    reply = answer(memory, bytes.fromhex("17 0000 0001 0000 0001 02 00AA"), 0)
    assert reply.pdu == bytes.fromhex("17 02 00AA")  # the write happens before the read


# --- RTU framing ------------------------------------------------------------------------------


def test_crc_of_a_known_frame() -> None:
    # The classic example from the Modbus over serial line guide: 01 03 00 00 00 0A C5 CD.
    assert rtu_frame(1, bytes.fromhex("03 0000 000A")) == bytes.fromhex("01 03 0000 000A C5CD")
    assert crc16(bytes.fromhex("01 03 0000 000A C5CD")) == 0  # a frame with its CRC checks to 0


def test_corrupt_crc_is_wrong() -> None:
    frame = rtu_frame(1, bytes.fromhex("03 0000 000A"), corrupt_crc=True)
    assert frame[:-2] == bytes.fromhex("01 03 0000 000A")
    assert crc16(frame) != 0


def test_parser_cuts_frames_across_chunks_and_hunts_past_noise() -> None:
    parser = RtuParser()
    one = rtu_frame(1, bytes.fromhex("03 0000 0002"))
    two = rtu_frame(2, bytes.fromhex("10 0000 0002 04 0001 0002"))
    unknown = rtu_frame(3, bytes.fromhex("2B 0E 01 00"))
    stream = b"\x55\xaa" + one + two + unknown
    frames = []
    for i in range(0, len(stream), 3):
        frames += parser.feed(stream[i : i + 3])
    assert frames == [(1, one[1:-2]), (2, two[1:-2]), (3, unknown[1:-2])]
    assert not parser.pending

"""The simulator's encoder against hand-computed words, and encode/decode round trips.

The words here were worked out by hand from the byte-order rules in
``firmware_sim.codec``, not with the code under test.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from firmware_sim.codec import BYTE_ORDERS, ByteOrder, RegisterType, decode, encode, normalize_byte_order

ORDERS: list[ByteOrder] = ["ABCD", "CDAB", "BADC", "DCBA"]


@pytest.mark.parametrize(
    ("value", "type_", "words"),
    [
        # 16-bit: ABCD/CDAB as is, BADC/DCBA swap the two bytes
        (-2, "int16", {"ABCD": [0xFFFE], "CDAB": [0xFFFE], "BADC": [0xFEFF], "DCBA": [0xFEFF]}),
        (0x1234, "uint16", {"ABCD": [0x1234], "CDAB": [0x1234], "BADC": [0x3412], "DCBA": [0x3412]}),
        (
            0x12345678,
            "uint32",
            {
                "ABCD": [0x1234, 0x5678],
                "CDAB": [0x5678, 0x1234],
                "BADC": [0x3412, 0x7856],
                "DCBA": [0x7856, 0x3412],
            },
        ),
        (
            -2,
            "int32",
            {
                "ABCD": [0xFFFF, 0xFFFE],
                "CDAB": [0xFFFE, 0xFFFF],
                "BADC": [0xFFFF, 0xFEFF],
                "DCBA": [0xFEFF, 0xFFFF],
            },
        ),
        (  # 1.5 = 0x3FC00000
            1.5,
            "float32",
            {
                "ABCD": [0x3FC0, 0x0000],
                "CDAB": [0x0000, 0x3FC0],
                "BADC": [0xC03F, 0x0000],
                "DCBA": [0x0000, 0xC03F],
            },
        ),
        (
            0x0102030405060708,
            "uint64",
            {
                "ABCD": [0x0102, 0x0304, 0x0506, 0x0708],
                "CDAB": [0x0708, 0x0506, 0x0304, 0x0102],
                "BADC": [0x0201, 0x0403, 0x0605, 0x0807],
                "DCBA": [0x0807, 0x0605, 0x0403, 0x0201],
            },
        ),
        (
            -2,
            "int64",
            {
                "ABCD": [0xFFFF, 0xFFFF, 0xFFFF, 0xFFFE],
                "CDAB": [0xFFFE, 0xFFFF, 0xFFFF, 0xFFFF],
                "BADC": [0xFFFF, 0xFFFF, 0xFFFF, 0xFEFF],
                "DCBA": [0xFEFF, 0xFFFF, 0xFFFF, 0xFFFF],
            },
        ),
        (  # 1.0 = 0x3FF0000000000000
            1.0,
            "float64",
            {
                "ABCD": [0x3FF0, 0, 0, 0],
                "CDAB": [0, 0, 0, 0x3FF0],
                "BADC": [0xF03F, 0, 0, 0],
                "DCBA": [0, 0, 0, 0xF03F],
            },
        ),
        (True, "bool", {"ABCD": [1], "CDAB": [1], "BADC": [1], "DCBA": [1]}),
        (0, "bool", {"ABCD": [0], "CDAB": [0], "BADC": [0], "DCBA": [0]}),
    ],
)
@pytest.mark.parametrize("order", ORDERS)
def test_every_type_in_every_byte_order(
    value: float, type_: RegisterType, words: dict[str, list[int]], order: ByteOrder
) -> None:
    assert encode(value, type_, byte_order=order) == words[order]
    assert decode(words[order], type_, byte_order=order) == value


@pytest.mark.parametrize(
    ("order", "words"),
    [
        # first character in the high byte; CDAB does not reverse a string's words
        ("ABCD", [0x4142, 0x4300, 0x0000]),
        ("CDAB", [0x4142, 0x4300, 0x0000]),
        # first character in the low byte
        ("BADC", [0x4241, 0x0043, 0x0000]),
        ("DCBA", [0x4241, 0x0043, 0x0000]),
    ],
)
def test_strings_are_nul_padded_two_characters_per_register(order: ByteOrder, words: list[int]) -> None:
    assert encode("ABC", "string", byte_order=order, length=3) == words
    assert decode(words, "string", byte_order=order) == "ABC"


def test_a_long_string_is_cut_at_its_length() -> None:
    assert encode("ABCDE", "string", length=2) == [0x4142, 0x4344]


def test_eight_letter_orders_are_synonyms() -> None:
    assert {normalize_byte_order(n) for n in ("ABCDEFGH", "GHEFCDAB", "BADCFEHG", "HGFEDCBA")} == set(ORDERS)
    assert [BYTE_ORDERS[n] for n in ("ABCDEFGH", "GHEFCDAB", "BADCFEHG", "HGFEDCBA")] == ORDERS
    with pytest.raises(ValueError, match="got 'ABDC'"):
        normalize_byte_order("ABDC")


def test_64_bit_integers_clamp_and_stay_exact() -> None:
    assert encode(2**64, "uint64") == [0xFFFF] * 4
    assert encode(-1, "uint64") == [0] * 4
    assert encode(2**63 - 1, "int64") == [0x7FFF, 0xFFFF, 0xFFFF, 0xFFFF]  # an int is not rounded through a float
    assert encode(1.5, "int64", 0.1) == [0, 0, 0, 15]


def test_scale_applies_to_decoding() -> None:
    assert decode(encode(230.4, "uint16", 0.1), "uint16", 0.1) == pytest.approx(230.4)


# --- round trips -----------------------------------------------------------------------------

INT_RANGES = {
    "int16": (-(2**15), 2**15 - 1),
    "uint16": (0, 2**16 - 1),
    "int32": (-(2**31), 2**31 - 1),
    "uint32": (0, 2**32 - 1),
    "int64": (-(2**63), 2**63 - 1),
    "uint64": (0, 2**64 - 1),
}


@st.composite
def integers(draw: st.DrawFn) -> tuple[RegisterType, int]:
    type_ = draw(st.sampled_from(sorted(INT_RANGES)))
    low, high = INT_RANGES[type_]
    return type_, draw(st.integers(low, high))  # type: ignore[return-value]


@given(integers(), st.sampled_from(list(BYTE_ORDERS)))
def test_integers_round_trip(typed: tuple[RegisterType, int], name: str) -> None:
    type_, value = typed
    order = normalize_byte_order(name)
    words = encode(value, type_, byte_order=order)
    assert all(0 <= w <= 0xFFFF for w in words)
    assert decode(words, type_, byte_order=order) == value


@given(st.floats(allow_nan=False), st.sampled_from(ORDERS))
def test_float64_round_trips(value: float, order: ByteOrder) -> None:
    assert decode(encode(value, "float64", byte_order=order), "float64", byte_order=order) == value


@given(st.floats(width=32, allow_nan=False, allow_infinity=False), st.sampled_from(ORDERS))
def test_float32_round_trips(value: float, order: ByteOrder) -> None:
    assert decode(encode(value, "float32", byte_order=order), "float32", byte_order=order) == value


@given(st.floats(allow_nan=False, allow_infinity=False), st.sampled_from(ORDERS))
def test_float32_is_the_nearest_float32(value: float, order: ByteOrder) -> None:
    decoded = decode(encode(value, "float32", byte_order=order), "float32", byte_order=order)
    assert isinstance(decoded, float)
    assert math.isfinite(decoded)  # clamped, never inf
    if abs(value) < 3.4e38:
        assert decoded == pytest.approx(value, rel=2**-23, abs=1.2e-38)


@given(
    st.text(alphabet=st.characters(min_codepoint=1, max_codepoint=127), max_size=20),
    st.integers(10, 12),
    st.sampled_from(ORDERS),
)
def test_strings_round_trip(text: str, length: int, order: ByteOrder) -> None:
    words = encode(text, "string", byte_order=order, length=length)
    assert len(words) == length
    assert decode(words, "string", byte_order=order) == text


@given(st.integers(-(2**31), 2**31 - 1), st.sampled_from(["int32", "int64"]))
def test_byte_orders_are_permutations_of_abcd(value: int, type_: RegisterType) -> None:
    big = b"".join(w.to_bytes(2, "big") for w in encode(value, type_))
    for order in ORDERS:
        other = b"".join(w.to_bytes(2, "big") for w in encode(value, type_, byte_order=order))
        assert sorted(other) == sorted(big)
    little = b"".join(w.to_bytes(2, "big") for w in encode(value, type_, byte_order="DCBA"))
    assert little == big[::-1]

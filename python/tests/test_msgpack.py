"""The MessagePack codec of calls by name (``distrpc._core``): what Rust's serde encoding
writes, read back; and what a peer could send that is malformed, refused with a ValueError
(never a crash, a hang or an allocation by a declared length)."""

from __future__ import annotations

import pytest
from distrpc._core import msgpack_dumps, msgpack_loads


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        0,
        -1,
        -33,
        127,
        255,
        65536,
        -(2**63),
        2**64 - 1,
        1.5,
        "",
        "héllo",
        "x" * 70000,
        b"\x00\xff",
        b"y" * 300,
        [],
        [1, [2, [3, None]]],
        list(range(70000)),
        {"a": {"b": [1.0, "c"]}, 1: False},
    ],
)
def test_values_round_trip(value):
    assert msgpack_loads(msgpack_dumps(value)) == value


def test_encoding_is_rusts():
    # rmp_serde::to_vec(&(40i64, 2i64)), and a struct as a map, as the Rust side writes them.
    assert msgpack_dumps((40, 2)) == b"\x92\x28\x02"
    assert msgpack_loads(b"\x82\xa1n\x03\xa4mean\xcb\x40\x08\x00\x00\x00\x00\x00\x00") == {
        "n": 3,
        "mean": 3.0,
    }
    assert msgpack_loads(b"\xca\x3f\xc0\x00\x00") == 1.5  # a float32


def test_what_cannot_be_sent_is_named():
    with pytest.raises(TypeError, match="a set cannot be sent by name"):
        msgpack_dumps({1, 2})
    with pytest.raises(ValueError, match="64 bits"):
        msgpack_dumps(2**64)
    deep: list = []
    for _ in range(200):
        deep = [deep]
    with pytest.raises(ValueError, match="nested deeper"):
        msgpack_dumps(deep)


@pytest.mark.parametrize(
    "data, why",
    [
        (b"", "0 left"),
        (b"\xc1", "reserved"),
        (b"\x92\x01", "1 bytes declared, 0 left"),
        (b"\xdd\xff\xff\xff\xff", "declared"),  # an array of 4 billion items, none present
        (b"\xdb\xff\xff\xff\xff", "declared"),  # a string of 4 GiB
        (b"\xc6\x7f\xff\xff\xff", "declared"),  # bytes of 2 GiB
        (b"\x91" * 10000, "nested deeper"),  # no stack overflow
        (b"\xa2\xff\xfe", "utf-8"),
        (b"\xd6\x54\x00\x00\x00\x00", "tensor 0 is missing"),  # no tensor table here
        (b"\xd4\x01\x00", "unknown extension type 1"),
        (b"\xd5\x54\x00\x00", "tensor reference of 2 bytes"),
        (b"\x01\x02", "1 bytes after the value"),
    ],
)
def test_malformed_data_is_refused(data, why):
    with pytest.raises(ValueError, match=why):
        msgpack_loads(data)


def test_unhashable_keys_are_an_error_not_a_crash():
    with pytest.raises(TypeError):
        msgpack_loads(b"\x81\x90\x01")  # {[]: 1}

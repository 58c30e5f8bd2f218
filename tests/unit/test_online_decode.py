"""The vectorised decoders and the raw RESP builder of stages/shared/online/ against the
scalar decoders, Feast's protobufs and redis-py's own command packer."""

from __future__ import annotations

import random

import numpy as np
import pytest
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from redis.connection import Connection

from stages.shared.online.codec import (
    decode_column,
    decode_timestamp_ms,
    decode_timestamps_ms,
    decode_value,
    encode_timestamp_ms,
)
from stages.shared.online.errors import FeatureLayoutError
from stages.shared.online.keys import entity_key_prefix, redis_keys
from stages.shared.online.resp import resp_command, resp_fixed_width_commands


def _random_value(rng: random.Random, kinds: str) -> bytes | None:
    kind = rng.choice(kinds)
    if kind == "d":
        return ValueProto(double_val=rng.uniform(-1e9, 1e9)).SerializeToString()
    if kind == "i":
        v = rng.choice([0, 1, -1, 127, 128, 2**40, -(2**63), 2**63 - 1, rng.randint(-9, 10**6)])
        return ValueProto(int64_val=v).SerializeToString()
    if kind == "s":
        return ValueProto(int64_val=rng.randint(0, 127)).SerializeToString()
    if kind == "x":
        return ValueProto(int32_val=rng.randint(-(2**31), 2**31 - 1)).SerializeToString()
    if kind == "b":
        return ValueProto(bool_val=rng.random() < 0.5).SerializeToString()
    if kind == "f":
        return ValueProto(float_val=rng.uniform(-5, 5)).SerializeToString()
    if kind == "n":
        return None
    return b""


@pytest.mark.parametrize("kinds", ["dixbfn0", "d", "s", "sn", "dn0", "i"])
def test_decode_column_equals_scalar_decoding(kinds: str) -> None:
    rng = random.Random(kinds)
    raws = [_random_value(rng, kinds) for _ in range(2_000)]
    expected = np.array([decode_value(r) for r in raws])
    np.testing.assert_array_equal(decode_column(raws), expected)


def test_decode_column_rejects_unsupported_values_and_empty_is_empty() -> None:
    with pytest.raises(FeatureLayoutError):
        decode_column([ValueProto(double_val=1.0).SerializeToString(), b"\x12\x03abc"])
    assert decode_column([]).shape == (0,)


def test_decode_timestamps_equals_scalar_decoding() -> None:
    rng = random.Random(1)
    raws: list[bytes | None] = [None, b""]
    for _ in range(3_000):
        raws.append(encode_timestamp_ms(rng.choice([0, 1, 999, 1000, rng.randint(0, 4 * 10**12)])))
    expected = np.array([decode_timestamp_ms(r) for r in raws], dtype=np.int64)
    np.testing.assert_array_equal(decode_timestamps_ms(raws), expected)
    with pytest.raises(FeatureLayoutError):
        decode_timestamps_ms([encode_timestamp_ms(5_000), b"\x18\x01"])


def test_resp_matches_redis_py_packer() -> None:
    packer = Connection()
    args = (b"HMGET", b"k\x00\r\n", b"", b"f" * 300)
    assert resp_command(*args) == b"".join(packer.pack_command(*args))
    ids = np.array([0, 7, -1, 2**40])
    keys = redis_keys("customer_id", "proj", ids)
    fields = (b"\x01\x02\x03\x04", b"_ts:v")
    key_len = len(keys[0])
    head = b"*4\r\n$5\r\nHMGET\r\n$%d\r\n" % key_len
    tail = b"proj\r\n" + b"".join(b"$%d\r\n%s\r\n" % (len(f), f) for f in fields)
    built = resp_fixed_width_commands(head, entity_key_prefix("customer_id"), ids, tail)
    assert built == b"".join(resp_command(b"HMGET", k, *fields) for k in keys)

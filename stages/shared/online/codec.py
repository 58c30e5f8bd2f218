"""Feast's protobuf values and timestamps, encoded and decoded by hand.

Only the wire format of the few types this pipeline stores (``FORMAT.md``): a ``double`` is
tag ``0x29`` + 8 bytes, an ``int64`` tag ``0x20`` + varint, a Timestamp ``0x08`` varint
seconds + ``0x10`` varint nanos. The column decoders are vectorised over a micro-batch (the
reader's hot path); the scalar decoders are the reference they are tested against and the
fallback for the rare value the vectorised path does not handle.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np

from stages.shared.online.errors import FeatureLayoutError

# Tags of the Value oneof members this pipeline stores (field number << 3 | wire type).
_TAG_INT64: Final = 0x20  # field 4, varint
_TAG_DOUBLE: Final = 0x29  # field 5, 64-bit
_TAG_INT32: Final = 0x18  # field 3, varint
_TAG_FLOAT: Final = 0x35  # field 6, 32-bit
_TAG_BOOL: Final = 0x38  # field 7, varint
_DOUBLE = struct.Struct("<d")
_FLOAT = struct.Struct("<f")
# A packed (tag, double) record: the exact bytes of Value(double_val=x).
_DOUBLE_RECORD = np.dtype([("tag", "u1"), ("val", "<f8")])

# Feast value types whose online value this module can decode to float64 and encode.
SUPPORTED_DTYPES: Final = frozenset({"Int64", "Float64", "Int32", "Float32", "Bool"})


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    """Decode a varint at ``pos``; returns (value as unsigned, next position)."""
    result = 0
    shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def decode_value(raw: bytes | None) -> float:
    """A serialized ``feast.types.Value`` as float (NaN for null/absent).

    Raises:
        FeatureLayoutError: for a Value oneof this pipeline does not store (strings, lists).
    """
    if not raw:
        return float("nan")
    tag = raw[0]
    if tag == _TAG_DOUBLE:
        return float(_DOUBLE.unpack_from(raw, 1)[0])
    if tag == _TAG_INT64:
        return float(raw[1]) if len(raw) == 2 else float(_signed64(_varint(raw, 1)[0]))
    if tag == _TAG_INT32:
        value = _varint(raw, 1)[0]
        return float(value - (1 << 64) if value >= 1 << 63 else value)
    if tag == _TAG_FLOAT:
        return float(_FLOAT.unpack_from(raw, 1)[0])
    if tag == _TAG_BOOL:
        return float(_varint(raw, 1)[0] != 0)
    if tag == 0x48 or tag == 0xF0:
        # null_val (field 9 or legacy 30): an explicit null.
        return float("nan")
    raise FeatureLayoutError("value", f"cannot decode Value bytes {raw[:12]!r}")


# Fixed-width views of serialized values: numpy converts a sequence of bytes to ``S<width>``
# in C, zero-padded. ``None`` (an absent field) becomes b"None", whose first byte 0x4E (field
# 9, wire type 6) no valid protobuf starts with, so it is told apart from any real value.
VALUE_WIDTH: Final = 11  # tag + the longest varint (10 bytes); a double is 9 bytes
TS_WIDTH: Final = 24  # two tags and two varints (<= 10 + 5 bytes)
_ABSENT_TAG: Final = ord("N")
_NULL_TAGS: Final = (0, 0x48, 0xF0, _ABSENT_TAG)  # empty bytes, null_val, legacy null, absent
_SHIFTS: Final = np.arange(0, 70, 7, dtype=np.uint64)


def fixed_width(raws: Sequence[bytes | None], width: int) -> np.ndarray:
    """``(n, width)`` uint8 matrix of the values, zero-padded (longer values truncated)."""
    n = len(raws)
    if n == 0:
        return np.zeros((0, width), dtype=np.uint8)
    return np.array(raws, dtype=f"S{width}").view(np.uint8).reshape(-1, width)


def _varints_at(u8: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Decode one varint per row starting at column ``pos[row]``; returns (values as
    uint64, lengths in bytes)."""
    width = u8.shape[1]
    idx = np.minimum(pos[:, None] + np.arange(10), width - 1)
    win = np.take_along_axis(u8, idx, axis=1)
    more = win >= 0x80
    include = np.ones_like(more)
    include[:, 1:] = np.logical_and.accumulate(more[:, :-1], axis=1)
    parts = (win & 0x7F).astype(np.uint64) << _SHIFTS
    values = np.where(include, parts, np.uint64(0)).sum(axis=1, dtype=np.uint64)
    return values, include.sum(axis=1)


@dataclass(frozen=True, slots=True)
class RawAt:
    """Original bytes of value ``i`` of a ``(rows, width)`` block starting at field ``at``
    of each reply, for the rare values decoded one by one."""

    rows: Sequence[Sequence[bytes | None]]
    at: int
    width: int

    def __call__(self, i: int) -> bytes | None:
        return self.rows[i // self.width][self.at + i % self.width]


def decode_values_matrix(u8: np.ndarray, raw_at: Callable[[int], bytes | None]) -> np.ndarray:
    """Values of an ``(n, >= 11)`` fixed-width matrix (see :func:`fixed_width`) as float64;
    ``raw_at(i)`` gives row ``i``'s original bytes for the rare rows decoded one by one."""
    n = len(u8)
    tag = u8[:, 0]
    is_double = tag == _TAG_DOUBLE
    if is_double.all():
        return np.ascontiguousarray(u8[:, 1:9]).view("<f8")[:, 0].copy()
    out = np.full(n, np.nan, dtype=np.float64)
    if is_double.any():
        out[is_double] = np.ascontiguousarray(u8[is_double, 1:9]).view("<f8")[:, 0]
    is_bool = tag == _TAG_BOOL
    is_int = (tag == _TAG_INT64) | (tag == _TAG_INT32) | is_bool
    if is_int.any():
        first = u8[:, 1]
        if (first[is_int] < 0x80).all():  # every varint one byte long: counts, flags
            ints = first.astype(np.int64)
        else:
            ints = _varints_at(u8, np.ones(n, dtype=np.int64))[0].view(np.int64)
        ints = np.where(is_bool, ints != 0, ints)
        out[is_int] = ints[is_int]
    is_float = tag == _TAG_FLOAT
    if is_float.any():
        out[is_float] = np.ascontiguousarray(u8[is_float, 1:5]).view("<f4")[:, 0]
    known = is_double | is_int | is_float | np.isin(tag, _NULL_TAGS)
    if not known.all():
        for i in np.flatnonzero(~known).tolist():
            out[i] = decode_value(raw_at(i))  # raises for what this module does not store
    return out


def decode_column(raws: Sequence[bytes | None]) -> np.ndarray:
    """Decode one feature's serialized Values for many rows to float64 (NaN where null),
    vectorised for every type this module stores.

    Raises:
        FeatureLayoutError: for a Value oneof this pipeline does not store (strings, lists).
    """
    return decode_values_matrix(fixed_width(raws, VALUE_WIDTH), raws.__getitem__)


def decode_timestamps_matrix(
    u8: np.ndarray, raw_at: Callable[[int], bytes | None]
) -> tuple[np.ndarray, np.ndarray]:
    """Timestamps of an ``(n, 24)`` fixed-width matrix: (epoch ms, present)."""
    n, width = u8.shape
    rows = np.arange(n)
    tag0 = u8[:, 0]
    present = tag0 != _ABSENT_TAG
    has_seconds = tag0 == 0x08
    seconds_u, seconds_len = _varints_at(u8, np.ones(n, dtype=np.int64))
    at = np.where(has_seconds, 1 + seconds_len, 0)
    has_nanos = u8[rows, np.minimum(at, width - 1)] == 0x10
    nanos_u, nanos_len = _varints_at(u8, np.minimum(at + 1, width - 1))
    end = np.where(has_nanos, at + 1 + nanos_len, at)
    out = np.where(has_seconds, seconds_u.view(np.int64), 0) * 1000
    out += np.where(has_nanos, nanos_u.view(np.int64), 0) // 1_000_000
    # Anything but [seconds][nanos] then zero padding (another tag, a truncated value) goes
    # through the scalar decoder, which raises for what is not a Timestamp.
    empty = ~present | (tag0 == 0)
    odd = ~empty & ((end >= width) | (u8[rows, np.minimum(end, width - 1)] != 0))
    out[empty] = 0
    if odd.any():
        for i in np.flatnonzero(odd).tolist():
            out[i] = decode_timestamp_ms(raw_at(i))
    return out, present


def decode_timestamps_ms(raws: Sequence[bytes | None]) -> np.ndarray:
    """:func:`decode_timestamp_ms` of many serialized Timestamps, vectorised (0 where
    absent or empty)."""
    return decode_timestamps_matrix(fixed_width(raws, TS_WIDTH), raws.__getitem__)[0]


def decode_timestamp_ms(raw: bytes | None) -> int:
    """A serialized ``google.protobuf.Timestamp`` as epoch milliseconds (0 when absent)."""
    if not raw:
        return 0
    seconds = 0
    nanos = 0
    pos = 0
    end = len(raw)
    while pos < end:
        tag = raw[pos]
        value, pos = _varint(raw, pos + 1)
        if tag == 0x08:
            seconds = _signed64(value)
        elif tag == 0x10:
            nanos = value
        else:
            raise FeatureLayoutError("timestamp", f"unexpected tag {tag:#x} in {raw!r}")
    return seconds * 1000 + nanos // 1_000_000


def _encode_varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_timestamp_ms(ms: int) -> bytes:
    """``Timestamp(seconds, nanos).SerializeToString()`` of epoch milliseconds ``ms >= 0``."""
    seconds, rem = divmod(int(ms), 1000)
    out = b""
    if seconds:
        out = b"\x08" + _encode_varint(seconds)
    if rem:
        out += b"\x10" + _encode_varint(rem * 1_000_000)
    return out


def encode_column(dtype: str, values: np.ndarray) -> list[bytes]:
    """Serialized ``feast.types.Value`` of each value as Feast writes it (NaN -> null ``b""``).

    Args:
        dtype: the feature's Feast dtype name.
        values: one value per row (numeric; floats may be NaN for null).
    """
    arr = np.asarray(values)
    n = len(arr)
    if dtype == "Float64":
        f = arr.astype(np.float64)
        records = np.empty(n, dtype=_DOUBLE_RECORD)
        records["tag"] = _TAG_DOUBLE
        records["val"] = f
        buf = records.tobytes()
        out = [buf[i : i + 9] for i in range(0, 9 * n, 9)]
        for i in np.flatnonzero(np.isnan(f)).tolist():
            out[i] = b""
        return out
    if dtype in ("Int64", "Int32", "Bool"):
        tag = {"Int64": b"\x20", "Int32": b"\x18", "Bool": b"\x38"}[dtype]
        if arr.dtype.kind == "f":
            null = np.isnan(arr)
            ints = np.where(null, 0, arr).astype(np.int64)
        else:
            null = np.zeros(n, dtype=bool)
            ints = arr.astype(np.int64)
        if dtype == "Bool":
            ints = (ints != 0).astype(np.int64)
        # Counts and flags repeat: encode each distinct value once.
        uniq, inverse = np.unique(ints, return_inverse=True)
        table = [tag + _encode_varint(v) for v in uniq.tolist()]
        out = [table[i] for i in inverse.tolist()]
        for i in np.flatnonzero(null).tolist():
            out[i] = b""
        return out
    if dtype == "Float32":
        f32 = arr.astype(np.float32)
        out = [b"\x35" + _FLOAT.pack(v) for v in f32.tolist()]
        for i in np.flatnonzero(np.isnan(f32)).tolist():
            out[i] = b""
        return out
    raise FeatureLayoutError("dtype", f"cannot encode {dtype}")

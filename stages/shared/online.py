"""Fast batched access to Feast's Redis online store, in Feast's own layout.

Feast's Redis layout (``feast/infra/online_stores/redis.py``, Feast 0.67), reproduced here so
that Feast's SDK reads what we write and we read what Feast writes:

- One Redis hash per entity key and project: the key is
  ``serialize_entity_key(EntityKey, version=3) + project.encode()``. For a single Int64 join
  key ``k`` that is ``<u32 1><u32 STRING=2><u32 len(k)>k<u32 INT64=4><u32 8><i64 value>``,
  all little-endian, followed by the project name.
- Fields of one feature view live in that hash: ``mmh3_32(f"{view}:{feature}")`` as 4
  little-endian bytes holds a serialized ``feast.types.Value`` (empty bytes = null), and
  ``_ts:{view}`` holds a serialized ``google.protobuf.Timestamp`` (the row's event time).
  Views of the same entity share the hash; ``_ts:{view}`` tells whether a view was written.
- Writes are skipped when the stored ``_ts:{view}`` is at or after the new event time, and
  ``EXPIRE key_ttl_seconds`` follows every write that happens, when the option is set.

The hot path decodes those protobufs by hand (a ``double`` is tag ``0x29`` + 8 bytes, an
``int64`` tag ``0x20`` + varint, a Timestamp ``0x08`` varint seconds + ``0x10`` varint nanos)
and keeps everything else out of the loop: keys and field names are precomputed.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from itertools import chain
from typing import TYPE_CHECKING, Any, Final, Protocol

import mmh3
import numpy as np
import orjson

if TYPE_CHECKING:
    from feast import FeatureStore

logger = logging.getLogger(__name__)

# feast.protos.feast.types.Value_pb2.ValueType enum values used in the entity key encoding.
_VT_STRING: Final = 2
_VT_INT64: Final = 4
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


class FeatureLayoutError(ValueError):
    """The registry or a request does not fit the online layout this module implements."""

    def __init__(self, what: str, detail: str) -> None:
        super().__init__(f"{what}: {detail}")
        self.what = what
        self.detail = detail


class OnlineWriteError(RuntimeError):
    """A batched online write failed in Redis."""

    def __init__(self, view: str, rows: int, detail: str) -> None:
        super().__init__(f"online write to {view} ({rows} rows) failed: {detail}")
        self.view = view
        self.rows = rows
        self.detail = detail


class RedisPipeline(Protocol):
    """The subset of a redis-py pipeline used here."""

    def hmget(self, name: bytes, keys: Sequence[bytes], *args: Any) -> Any: ...

    def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any: ...

    def execute(self, raise_on_error: bool = True) -> list[Any]: ...

    def reset(self) -> None: ...


class RedisClient(Protocol):
    """The subset of a redis-py client used here (``redis.Redis`` satisfies it).

    ``pipeline`` returns ``Any`` because redis-py's own stubs type keys and fields as ``str``
    while Feast's layout is bytes; the object must behave like :class:`RedisPipeline`.
    """

    def pipeline(self, transaction: Any = True, shard_hint: Any = None) -> Any: ...

    def script_load(self, script: Any) -> Any: ...


# ------------------------------------------------------------------------------------------
# Layout: everything derived from the registry, computed once.


def field_key(view: str, feature: str) -> bytes:
    """Hash field of one feature, as Feast's ``_mmh3(f"{view}:{feature}")`` computes it."""
    return struct.pack("<I", mmh3.hash(f"{view}:{feature}", signed=False))


def ts_field(view: str) -> bytes:
    """Hash field holding the serialized event Timestamp of ``view``'s row."""
    return f"_ts:{view}".encode()


def entity_key_prefix(join_key: str) -> bytes:
    """Serialized entity key (version 3) of a single Int64 join key, up to the 8 value bytes."""
    encoded = join_key.encode()
    return (
        struct.pack("<III", 1, _VT_STRING, len(encoded))
        + encoded
        + struct.pack("<II", _VT_INT64, 8)
    )


def redis_keys(join_key: str, project: str, ids: np.ndarray) -> list[bytes]:
    """Redis keys of many Int64 entity ids, vectorised.

    Args:
        join_key: the entity's join key, e.g. ``customer_id``.
        project: the Feast project.
        ids: integer entity ids.

    Returns:
        ``serialize_entity_key(EntityKey(join_key=id), 3) + project`` for each id, in order.
    """
    prefix = entity_key_prefix(join_key)
    suffix = project.encode()
    n = len(ids)
    width = len(prefix) + 8 + len(suffix)
    rows = np.empty((n, width), dtype=np.uint8)
    rows[:, : len(prefix)] = np.frombuffer(prefix, dtype=np.uint8)
    rows[:, len(prefix) : len(prefix) + 8] = (
        np.ascontiguousarray(ids, dtype="<i8").view(np.uint8).reshape(n, 8)
    )
    rows[:, len(prefix) + 8 :] = np.frombuffer(suffix, dtype=np.uint8)
    buf = rows.tobytes()
    return [buf[i : i + width] for i in range(0, n * width, width)]


@dataclass(frozen=True, slots=True)
class ViewLayout:
    """Where one feature view's values live in Redis.

    Attributes:
        name: the name used in hash fields (the versioned name when Feast versioning is on).
        join_key: the single Int64 join key of the view's entity.
        features: every feature of the view, in the view's schema order.
        dtypes: Feast dtype names of ``features`` (``Int64``, ``Float64``, ...).
        field_keys: the mmh3 hash field of each feature.
        ts_field: the ``_ts:<view>`` hash field.
    """

    name: str
    join_key: str
    features: tuple[str, ...]
    dtypes: tuple[str, ...]
    field_keys: tuple[bytes, ...] = field(init=False)
    ts_field: bytes = field(init=False)

    def __post_init__(self) -> None:
        if len(self.features) != len(self.dtypes):
            raise FeatureLayoutError(self.name, "features and dtypes differ in length")
        for dtype in self.dtypes:
            if dtype not in SUPPORTED_DTYPES:
                raise FeatureLayoutError(self.name, f"unsupported feature dtype {dtype}")
        object.__setattr__(
            self, "field_keys", tuple(field_key(self.name, f) for f in self.features)
        )
        object.__setattr__(self, "ts_field", ts_field(self.name))


@dataclass(frozen=True, slots=True)
class OnlineLayout:
    """The online layout of a Feast project, read once from its registry.

    Attributes:
        project: Feast project (the Redis key suffix).
        views: layout of each feature view, by view name.
        services: per feature service, its ``(view, features)`` projections in order.
        key_ttl_seconds: Feast's ``online_store.key_ttl_seconds`` (``None``: no expiry).
        entity_key_serialization_version: must be 3.
    """

    project: str
    views: Mapping[str, ViewLayout]
    services: Mapping[str, tuple[tuple[str, tuple[str, ...]], ...]]
    key_ttl_seconds: int | None = None
    entity_key_serialization_version: int = 3

    def __post_init__(self) -> None:
        if self.entity_key_serialization_version != 3:
            raise FeatureLayoutError(
                "entity_key_serialization_version",
                f"{self.entity_key_serialization_version}; only version 3 is implemented",
            )

    def view(self, name: str) -> ViewLayout:
        """Layout of a view by name; raises :class:`FeatureLayoutError` if unknown."""
        try:
            return self.views[name]
        except KeyError:
            raise FeatureLayoutError(name, f"no such feature view in {self.project}") from None

    def keys(self, view: str, ids: np.ndarray) -> list[bytes]:
        """Redis keys of ``ids`` for ``view``'s entity."""
        return redis_keys(self.view(view).join_key, self.project, ids)

    def to_json(self) -> bytes:
        """The layout as JSON (:meth:`from_json` reads it back)."""
        return orjson.dumps(
            {
                "project": self.project,
                "views": {
                    k: {
                        "name": v.name,
                        "join_key": v.join_key,
                        "features": v.features,
                        "dtypes": v.dtypes,
                    }
                    for k, v in self.views.items()
                },
                "services": self.services,
                "key_ttl_seconds": self.key_ttl_seconds,
                "entity_key_serialization_version": self.entity_key_serialization_version,
            }
        )

    @classmethod
    def from_json(cls, raw: bytes) -> OnlineLayout:
        """A layout written by :meth:`to_json`."""
        obj = orjson.loads(raw)
        return cls(
            project=obj["project"],
            views={
                k: ViewLayout(v["name"], v["join_key"], tuple(v["features"]), tuple(v["dtypes"]))
                for k, v in obj["views"].items()
            },
            services={
                name: tuple((view, tuple(feats)) for view, feats in projections)
                for name, projections in obj["services"].items()
            },
            key_ttl_seconds=obj["key_ttl_seconds"],
            entity_key_serialization_version=obj["entity_key_serialization_version"],
        )

    @classmethod
    def from_store(cls, store: FeatureStore) -> OnlineLayout:
        """Read the layout of every feature view and service from a store's registry.

        Args:
            store: an open Feast store whose online store is Redis.

        Raises:
            FeatureLayoutError: for layouts not implemented here (composite or non-Int64 join
                keys, unsupported dtypes, a non-Redis online store, serialization != 3).
        """
        from feast.infra.online_stores.helpers import compute_versioned_name

        config = store.config
        online = config.online_store
        if getattr(online, "type", None) != "redis" or getattr(
            online, "redis_type", "redis"
        ) not in (
            "redis",
            "redis_cluster",
            "redis_sentinel",
        ):
            raise FeatureLayoutError(
                "online_store", f"{getattr(online, 'type', online)!r} is not redis"
            )
        versioning = bool(getattr(config.registry, "enable_online_feature_view_versioning", False))
        entities = {e.name: e for e in store.list_entities()}
        views: dict[str, ViewLayout] = {}
        for fv in store.list_feature_views():
            if len(fv.entities) != 1:
                raise FeatureLayoutError(fv.name, f"needs exactly one entity, has {fv.entities}")
            entity = entities[fv.entities[0]]
            join_col = next((c for c in fv.entity_columns if c.name == entity.join_key), None)
            if join_col is not None and str(join_col.dtype) != "Int64":
                raise FeatureLayoutError(fv.name, f"join key {entity.join_key} is {join_col.dtype}")
            views[fv.name] = ViewLayout(
                name=compute_versioned_name(fv, versioning),
                join_key=entity.join_key,
                features=tuple(f.name for f in fv.features),
                dtypes=tuple(str(f.dtype) for f in fv.features),
            )
        services = {
            fs.name: tuple(
                (p.name, tuple(f.name for f in p.features)) for p in fs.feature_view_projections
            )
            for fs in store.list_feature_services()
        }
        return cls(
            project=config.project,
            views=views,
            services=services,
            key_ttl_seconds=getattr(online, "key_ttl_seconds", None),
            entity_key_serialization_version=config.entity_key_serialization_version,
        )


# ------------------------------------------------------------------------------------------
# Protobuf decoding and encoding, by hand: the wire format of the few types we store.


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
_VALUE_WIDTH: Final = 11  # tag + the longest varint (10 bytes); a double is 9 bytes
_TS_WIDTH: Final = 24  # two tags and two varints (<= 10 + 5 bytes)
_ABSENT_TAG: Final = ord("N")
_NULL_TAGS: Final = (0, 0x48, 0xF0, _ABSENT_TAG)  # empty bytes, null_val, legacy null, absent
_SHIFTS: Final = np.arange(0, 70, 7, dtype=np.uint64)
# Up to this many distinct entities, replies are decoded value by value.
_SCALAR_ROWS: Final = 16


def _fixed_width(raws: Sequence[bytes | None], width: int) -> np.ndarray:
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
class _RawAt:
    """Original bytes of value ``i`` of a ``(rows, width)`` block starting at field ``at``
    of each reply, for the rare values decoded one by one."""

    rows: Sequence[Sequence[bytes | None]]
    at: int
    width: int

    def __call__(self, i: int) -> bytes | None:
        return self.rows[i // self.width][self.at + i % self.width]


def _decode_values(u8: np.ndarray, raw_at: Callable[[int], bytes | None]) -> np.ndarray:
    """Values of an ``(n, >= 11)`` fixed-width matrix (see :func:`_fixed_width`) as float64;
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
    return _decode_values(_fixed_width(raws, _VALUE_WIDTH), raws.__getitem__)


def _decode_timestamps(
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
    return _decode_timestamps(_fixed_width(raws, _TS_WIDTH), raws.__getitem__)[0]


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


# ------------------------------------------------------------------------------------------
# Raw RESP round trips: redis-py spends ~10-20 us per pipelined command building and parsing
# it in Python; a batch's commands are regular enough to be built as one byte string (with
# numpy when only the 8 id bytes vary) and its replies parsed by hiredis in C.


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


def resp_command(*args: bytes) -> bytes:
    """One command in RESP (the Redis wire protocol), e.g. ``resp_command(b"PING")``."""
    return b"*%d\r\n" % len(args) + b"".join(_bulk(a) for a in args)


def resp_fixed_width_commands(
    head: bytes, key_prefix: bytes, ids: np.ndarray, tail: bytes
) -> bytes:
    """Many commands that differ only in 8 little-endian id bytes of their key, vectorised.

    Each command is ``head + key_prefix + <i64 id> + tail``: the caller puts the RESP array
    header, command name and key length in ``head`` and the rest of the key and the other
    arguments in ``tail``.
    """
    n = len(ids)
    template = np.frombuffer(head + key_prefix + b"\x00" * 8 + tail, dtype=np.uint8)
    rows = np.tile(template, (n, 1))
    at = len(head) + len(key_prefix)
    rows[:, at : at + 8] = np.ascontiguousarray(ids, dtype="<i8").view(np.uint8).reshape(n, 8)
    return rows.tobytes()


def reply_error(reply: object) -> Exception:
    """The redis-py exception for an error reply read on the raw path, as redis-py's own
    parser would raise it: ``LOADING`` (a restarted server reading its append-only file) is
    :class:`redis.exceptions.BusyLoadingError`, a ``ConnectionError`` the stages back off
    from; anything else a ``ResponseError``."""
    from redis.exceptions import BusyLoadingError, ResponseError

    text = str(reply)
    if text.startswith("LOADING"):
        return BusyLoadingError(text)
    return ResponseError(text)


class RawRedis:
    """Pipelined raw RESP on one pooled connection of a redis-py ``Redis`` client (RESP2).

    Errors surface as redis-py's own exceptions (``ConnectionError``, ``TimeoutError``); a
    connection that failed mid-way is closed, never returned to the pool half-read. Error
    replies are returned in place (as ``hiredis.ReplyError``) for the caller to inspect.
    """

    def __init__(self, client: Any) -> None:
        self._pool = client.connection_pool

    @staticmethod
    def supports(client: object) -> bool:
        """Whether ``client`` is a plain redis-py client speaking RESP2 (not a cluster
        client, not a test fake)."""
        try:
            import hiredis  # noqa: F401
            import redis
        except ImportError:
            return False
        if not isinstance(client, redis.Redis):
            return False
        pool = getattr(client, "connection_pool", None)
        kwargs = getattr(pool, "connection_kwargs", None)
        if not isinstance(kwargs, dict):
            return False
        return str(kwargs.get("protocol") or 2) == "2"

    @contextmanager
    def _connection(self) -> Iterator[Any]:
        conn = self._pool.get_connection()
        try:
            yield conn
        except BaseException:
            conn.disconnect()
            raise
        finally:
            self._pool.release(conn)

    def round_trip(self, payload: bytes, n_replies: int) -> list[Any]:
        """Send ``payload`` (``n_replies`` commands) and return their replies in order."""
        import hiredis
        import redis

        if n_replies == 0:
            return []
        try:
            return self._round_trip(payload, n_replies, hiredis.Reader())
        except redis.ConnectionError:
            # A pooled connection the server closed (restart, idle timeout): one retry on a
            # fresh connection, as redis-py does for its own commands.
            return self._round_trip(payload, n_replies, hiredis.Reader())

    def _round_trip(self, payload: bytes, n_replies: int, reader: Any) -> list[Any]:
        import redis

        with self._connection() as conn:
            conn.send_packed_command([payload], check_health=False)
            sock = conn._sock  # redis-py's socket, read here so that hiredis parses in bulk
            if sock is None:
                raise redis.ConnectionError("connection closed before the replies were read")
            buf = bytearray(1 << 17)
            view = memoryview(buf)
            replies: list[Any] = []
            append = replies.append
            gets = reader.gets
            try:
                while len(replies) < n_replies:
                    reply = gets()
                    if reply is False:
                        n = sock.recv_into(view)
                        if n == 0:
                            raise redis.ConnectionError("Redis closed the connection")
                        reader.feed(view, 0, n)
                        continue
                    append(reply)
            except TimeoutError:  # socket.timeout
                raise redis.TimeoutError("timeout reading pipelined replies") from None
            except OSError as exc:
                raise redis.ConnectionError(f"error reading pipelined replies: {exc}") from None
            return replies


# ------------------------------------------------------------------------------------------
# Reader


@dataclass(frozen=True, slots=True)
class OnlineBatch:
    """Online features of one micro-batch.

    Attributes:
        values: float64 ``(n, n_features)`` in the feature service's order; NaN where missing.
        event_ts_ms: per view, the row's event time in epoch ms (0 where the view is missing).
        found: per view, whether the entity has a row of that view.
        feature_names: column names of ``values``.
    """

    values: np.ndarray
    event_ts_ms: dict[str, np.ndarray]
    found: dict[str, np.ndarray]
    feature_names: tuple[str, ...]

    def take(self, keep: np.ndarray) -> OnlineBatch:
        """The rows where ``keep`` (a boolean mask) is True."""
        return OnlineBatch(
            values=self.values[keep],
            event_ts_ms={v: ts[keep] for v, ts in self.event_ts_ms.items()},
            found={v: f[keep] for v, f in self.found.items()},
            feature_names=self.feature_names,
        )


@dataclass(frozen=True, slots=True)
class _ViewRead:
    view: str
    join_key: str
    fields: tuple[bytes, ...]  # requested feature fields, then the _ts field
    columns: tuple[int, ...]  # output column of each requested feature


@dataclass(frozen=True, slots=True)
class _EntityRead:
    """One ``HMGET`` per entity for every view of the service on that entity (views of the
    same entity share the hash), with its RESP bytes around the 8 id bytes precomputed."""

    join_key: str
    fields: tuple[bytes, ...]
    views: tuple[tuple[_ViewRead, int], ...]  # each view and where its fields start
    head: bytes
    key_prefix: bytes
    tail: bytes

    @classmethod
    def build(cls, join_key: str, project: str, views: Sequence[_ViewRead]) -> _EntityRead:
        fields: list[bytes] = []
        placed = []
        for v in views:
            placed.append((v, len(fields)))
            fields.extend(v.fields)
        prefix = entity_key_prefix(join_key)
        suffix = project.encode()
        key_len = len(prefix) + 8 + len(suffix)
        return cls(
            join_key=join_key,
            fields=tuple(fields),
            views=tuple(placed),
            head=b"*%d\r\n$5\r\nHMGET\r\n$%d\r\n" % (2 + len(fields), key_len),
            key_prefix=prefix,
            tail=suffix + b"\r\n" + b"".join(_bulk(f) for f in fields),
        )


class OnlineFeatureReader:
    """Serves a feature service for a whole micro-batch in one pipelined round trip.

    Args:
        redis_client: a redis-py client (or anything meeting :class:`RedisClient`).
        store_or_layout: an open Feast store (its registry is read once, here) or a layout.
        feature_service_name: the feature service to serve, e.g. ``fraud_model_v1``.
        full_feature_names: name columns ``view__feature`` instead of ``feature``.
        exclude_views: views of the service not to read (computed elsewhere, on demand).

    Raises:
        FeatureLayoutError: unknown service or a layout not implemented here.
    """

    def __init__(
        self,
        redis_client: RedisClient,
        store_or_layout: FeatureStore | OnlineLayout,
        feature_service_name: str,
        *,
        full_feature_names: bool = False,
        exclude_views: Sequence[str] = (),
    ) -> None:
        layout = (
            store_or_layout
            if isinstance(store_or_layout, OnlineLayout)
            else OnlineLayout.from_store(store_or_layout)
        )
        if feature_service_name not in layout.services:
            raise FeatureLayoutError(
                feature_service_name, f"no such feature service in project {layout.project}"
            )
        self._client = redis_client
        self._layout = layout
        self.feature_service_name = feature_service_name
        reads: list[_ViewRead] = []
        names: list[str] = []
        for view_name, features in layout.services[feature_service_name]:
            if view_name in exclude_views:
                continue
            view = layout.view(view_name)
            index = {f: i for i, f in enumerate(view.features)}
            missing = [f for f in features if f not in index]
            if missing:
                raise FeatureLayoutError(view_name, f"service asks for unknown features {missing}")
            start = len(names)
            names.extend(f"{view_name}__{f}" if full_feature_names else f for f in features)
            reads.append(
                _ViewRead(
                    view=view_name,
                    join_key=view.join_key,
                    fields=(*(view.field_keys[index[f]] for f in features), view.ts_field),
                    columns=tuple(range(start, len(names))),
                )
            )
        if len(set(names)) != len(names):
            raise FeatureLayoutError(
                feature_service_name, "feature names collide; use full_feature_names=True"
            )
        self._reads = tuple(reads)
        self.feature_names: tuple[str, ...] = tuple(names)
        self.join_keys: tuple[str, ...] = tuple(dict.fromkeys(r.join_key for r in reads))
        self._entities = tuple(
            _EntityRead.build(k, layout.project, [r for r in reads if r.join_key == k])
            for k in self.join_keys
        )
        # Raw RESP for redis-py clients; anything else (a cluster client, a test fake) gets
        # the same commands through its pipeline().
        self._raw = RawRedis(redis_client) if RawRedis.supports(redis_client) else None
        # A Redis Cluster client: the same raw commands, one pipelined request per node.
        from stages.shared.online_cluster import cluster_transport

        self._cluster = cluster_transport(redis_client)

    @property
    def layout(self) -> OnlineLayout:
        """The layout this reader was built from."""
        return self._layout

    def read(self, entity_ids: Mapping[str, np.ndarray]) -> OnlineBatch:
        """Read the service's features for ``n`` rows.

        Args:
            entity_ids: one integer array of length ``n`` per join key (``customer_id``...).
                Repeated ids are fetched once.

        Returns:
            An :class:`OnlineBatch` with ``n`` rows.

        Raises:
            FeatureLayoutError: a join key is missing or arrays differ in length.
            redis.RedisError: Redis is unreachable or failed.
        """
        arrays: dict[str, np.ndarray] = {}
        n = -1
        for key in self.join_keys:
            if key not in entity_ids:
                raise FeatureLayoutError(key, "join key missing from entity_ids")
            arr = np.asarray(entity_ids[key])
            if arr.ndim != 1 or arr.dtype.kind not in "iu":
                raise FeatureLayoutError(
                    key, f"expected 1-d integer ids, got {arr.dtype}{arr.shape}"
                )
            if n >= 0 and len(arr) != n:
                raise FeatureLayoutError(key, f"length {len(arr)} != {n}")
            n = len(arr)
            arrays[key] = arr
        n = max(n, 0)

        # One HMGET per distinct entity id of each join key, all in one round trip.
        uniques = [
            (entity, *np.unique(arrays[entity.join_key], return_inverse=True))
            for entity in self._entities
        ]
        total = sum(len(u) for _, u, _ in uniques)
        if self._cluster is not None:
            replies = self._cluster.hmget_entities(
                self._layout.project, [(e, u) for e, u, _ in uniques]
            )
            bad = next((r for r in replies if not isinstance(r, list)), None)
            if bad is not None:
                from redis.exceptions import ResponseError

                raise ResponseError(str(bad))
        elif self._raw is not None:
            payload = b"".join(
                resp_fixed_width_commands(e.head, e.key_prefix, u, e.tail) for e, u, _ in uniques
            )
            replies = self._raw.round_trip(payload, total)
            bad = next((r for r in replies if not isinstance(r, list)), None)
            if bad is not None:
                raise reply_error(bad)
        else:
            pipe = self._client.pipeline(transaction=False)
            try:
                for entity, uniq, _ in uniques:
                    for rkey in redis_keys(entity.join_key, self._layout.project, uniq):
                        pipe.hmget(rkey, entity.fields)
                replies = pipe.execute()
            finally:
                pipe.reset()

        values = np.full((n, len(self.feature_names)), np.nan, dtype=np.float64)
        event_ts: dict[str, np.ndarray] = {}
        found: dict[str, np.ndarray] = {}
        offset = 0
        for entity, uniq, inverse in uniques:
            m = len(uniq)
            rows = replies[offset : offset + m]
            offset += m
            if m > _SCALAR_ROWS:
                # Every reply of the entity as one (m, fields, 24) byte matrix, built in C.
                mat = _fixed_width(rows, _TS_WIDTH).reshape(m, len(entity.fields), _TS_WIDTH)
            for read, at in entity.views:
                if m == 0:
                    event_ts[read.view] = np.zeros(n, dtype=np.int64)
                    found[read.view] = np.zeros(n, dtype=bool)
                    continue
                width = len(read.columns)
                if m <= _SCALAR_ROWS:
                    # A handful of rows: per-value decoding beats numpy's per-call overhead.
                    decoded = np.array(
                        [[decode_value(r[at + j]) for j in range(width)] for r in rows],
                        dtype=np.float64,
                    ).reshape(m, width)
                    ts_u = np.array([decode_timestamp_ms(r[at + width]) for r in rows], np.int64)
                    found_u = np.array([r[at + width] is not None for r in rows], dtype=bool)
                else:
                    block = mat[:, at : at + width, :_VALUE_WIDTH].reshape(m * width, _VALUE_WIDTH)
                    decoded = _decode_values(block, _RawAt(rows, at, width)).reshape(m, width)
                    ts_u, found_u = _decode_timestamps(
                        np.ascontiguousarray(mat[:, at + width, :]), _RawAt(rows, at + width, 1)
                    )
                values[:, read.columns[0] : read.columns[-1] + 1] = decoded[inverse]
                event_ts[read.view] = ts_u[inverse]
                found[read.view] = found_u[inverse]
        return OnlineBatch(
            values=values, event_ts_ms=event_ts, found=found, feature_names=self.feature_names
        )


# ------------------------------------------------------------------------------------------
# Writer

# Lua: the stored Timestamp proto ``cur`` (non-empty) as seconds ``s`` and nanos ``n``.
_LUA_DECODE_TS: Final = """
local s, n, pos = 0, 0, 1
local len = #cur
while pos <= len do
  local tag = string.byte(cur, pos)
  pos = pos + 1
  local v, mul = 0, 1
  while true do
    local b = string.byte(cur, pos)
    pos = pos + 1
    v = v + (b % 128) * mul
    mul = mul * 128
    if b < 128 then break end
  end
  if tag == 8 then s = v elseif tag == 16 then n = v end
end
"""

# KEYS[1]: entity hash. ARGV: ts field, new seconds, new nanos, new ts proto, ttl seconds (0 =
# none), then feature field/value pairs. Writes only if the stored _ts is absent or strictly
# older, exactly Feast's rule (equal timestamps are skipped), so replays are no-ops.
_WRITE_IF_NEWER: Final = (
    """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur and #cur > 0 then
"""
    + _LUA_DECODE_TS
    + """  local ns, nn = tonumber(ARGV[2]), tonumber(ARGV[3])
  if ns < s or (ns == s and nn <= n) then return 0 end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[4], unpack(ARGV, 6))
local ttl = tonumber(ARGV[5])
if ttl > 0 then redis.call('EXPIRE', KEYS[1], ttl) end
return 1
"""
)


# The same rule for many entities in one call (one script run instead of one per entity:
# Redis spent most of a batch's write time dispatching the per-entity calls).
# KEYS: entity hashes. ARGV: ts field, ttl seconds (0 = none), number of features F, the F
# feature fields, then per key: new seconds, new nanos, new ts proto, the F values.
# Returns the number of rows written.
_WRITE_MANY_IF_NEWER: Final = (
    """
local tsf, ttl, f = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local stride = 3 + f
local written = 0
local args = {tsf}
for j = 1, f do args[2 * j + 1] = ARGV[3 + j] end
for i = 1, #KEYS do
  local a = 4 + f + (i - 1) * stride
  local newer = true
  local cur = redis.call('HGET', KEYS[i], tsf)
  if cur and #cur > 0 then
"""
    + _LUA_DECODE_TS
    + """    local ns, nn = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
    if ns < s or (ns == s and nn <= n) then newer = false end
  end
  if newer then
    args[2] = ARGV[a + 2]
    for j = 1, f do args[2 * j + 2] = ARGV[a + 2 + j] end
    redis.call('HSET', KEYS[i], unpack(args))
    if ttl > 0 then redis.call('EXPIRE', KEYS[i], ttl) end
    written = written + 1
  end
end
return written
"""
)
# Rows per batched script call: bounds how long one call holds the (single-threaded) server.
_WRITE_CHUNK: Final = 1_000


class OnlineFeatureWriter:
    """Idempotent batched writes of feature rows into Feast's Redis layout.

    One round trip per batch: for a plain redis-py client, one ``EVALSHA`` per 1,000 rows
    with its RESP built here (for a Redis Cluster client, the same per node, all nodes at
    once: ``online_cluster.py``); for anything else (a cluster client, a test fake), one
    pipelined ``EVALSHA`` per entity. The script compares event times server-side, so
    concurrent writers and replays never move a row back in time.

    Args:
        redis_client: a redis-py client (or anything meeting :class:`RedisClient`).
        layout: the project's layout (:meth:`OnlineLayout.from_store`).
    """

    def __init__(self, redis_client: RedisClient, layout: OnlineLayout) -> None:
        self._client = redis_client
        self._layout = layout
        self._sha: str | None = None
        self._ttl = int(layout.key_ttl_seconds or 0)
        self._raw = RawRedis(redis_client) if RawRedis.supports(redis_client) else None
        self._script = _WRITE_MANY_IF_NEWER if self._raw is not None else _WRITE_IF_NEWER
        # A Redis Cluster client: the batched script per node (stages/shared/online_cluster.py).
        from stages.shared.online_cluster import CLUSTER_WRITE_MANY_IF_NEWER, cluster_transport

        self._cluster = cluster_transport(redis_client)
        if self._cluster is not None:
            self._script = CLUSTER_WRITE_MANY_IF_NEWER

    def _load_script(self) -> str:
        if self._cluster is not None:
            self._sha = self._cluster.script_load(self._script)
            return self._sha
        sha = self._client.script_load(self._script)
        self._sha = sha.decode() if isinstance(sha, bytes) else str(sha)
        return self._sha

    def write(
        self,
        view: str,
        entity_ids: np.ndarray,
        values: Mapping[str, np.ndarray],
        event_ts_ms: np.ndarray,
    ) -> int:
        """Write one row per entity, keeping the newest event time per entity.

        Args:
            view: feature view name.
            entity_ids: integer ids, length ``n``.
            values: every feature of the view, each an array of length ``n`` (NaN = null).
            event_ts_ms: event time of each row, epoch milliseconds (>= 0).

        Returns:
            Rows actually written (rows not newer than what Redis holds are skipped, as are
            all but the newest row of an entity within the call; ties keep the first).

        Raises:
            FeatureLayoutError: unknown view, missing/extra features, length mismatch.
            OnlineWriteError: Redis rejected the write.
        """
        layout = self._layout.view(view)
        ids = np.asarray(entity_ids)
        ts = np.asarray(event_ts_ms, dtype=np.int64)
        n = len(ids)
        if ids.ndim != 1 or (n and ids.dtype.kind not in "iu"):
            raise FeatureLayoutError(view, f"entity_ids must be 1-d integers, got {ids.dtype}")
        if ts.shape != (n,):
            raise FeatureLayoutError(view, f"event_ts_ms has shape {ts.shape}, expected ({n},)")
        expected = set(layout.features)
        if set(values) != expected:
            raise FeatureLayoutError(
                view,
                f"missing features {sorted(expected - set(values))}, "
                f"unknown {sorted(set(values) - expected)}",
            )
        for name in layout.features:
            if len(values[name]) != n:
                raise FeatureLayoutError(view, f"{name} has {len(values[name])} rows, expected {n}")
        if n == 0:
            return 0
        if (ts < 0).any():
            raise FeatureLayoutError(view, "event_ts_ms must be >= 0")

        # Newest row per entity (ties: first occurrence), as Feast's in-batch rule.
        order = np.lexsort((np.arange(n), -ts, ids))
        sorted_ids = ids[order]
        first = np.ones(n, dtype=bool)
        first[1:] = sorted_ids[1:] != sorted_ids[:-1]
        keep = order[first]

        keys = redis_keys(layout.join_key, self._layout.project, ids[keep])
        kept_ts = ts[keep].tolist()
        encoded = [
            encode_column(d, np.asarray(values[f])[keep])
            for f, d in zip(layout.features, layout.dtypes, strict=True)
        ]
        field_keys = layout.field_keys
        ts_name = layout.ts_field
        ttl = self._ttl

        def run_pipeline(sha: str) -> list[Any]:
            pipe = self._client.pipeline(transaction=False)
            try:
                for i, key in enumerate(keys):
                    ms = kept_ts[i]
                    args: list[Any] = [
                        ts_name,
                        ms // 1000,
                        (ms % 1000) * 1_000_000,
                        encode_timestamp_ms(ms),
                        ttl,
                    ]
                    for fk, col in zip(field_keys, encoded, strict=True):
                        args.append(fk)
                        args.append(col[i])
                    pipe.evalsha(sha, 1, key, *args)
                return pipe.execute(raise_on_error=True)
            finally:
                pipe.reset()

        def run_raw(sha: str) -> list[Any]:
            assert self._raw is not None
            from redis.exceptions import NoScriptError

            # Every argument column bulk-encoded once, then interleaved row by row in C.
            def bulks(col: Sequence[bytes]) -> list[bytes]:
                return [b"$%d\r\n%s\r\n" % (len(v), v) for v in col]

            ts_bulks: dict[int, bytes] = {}
            for ms in kept_ts:
                if ms not in ts_bulks:
                    ts_bulks[ms] = b"".join(
                        bulks(
                            [
                                b"%d" % (ms // 1000),
                                b"%d" % ((ms % 1000) * 1_000_000),
                                encode_timestamp_ms(ms),
                            ]
                        )
                    )
            sha_bulk = _bulk(sha.encode())
            fixed = [_bulk(ts_name), _bulk(b"%d" % ttl), _bulk(b"%d" % len(field_keys))]
            fixed += [_bulk(fk) for fk in field_keys]
            fixed_args = b"".join(fixed)
            key_bulks = bulks(keys)
            row_bulks = [[ts_bulks[ms] for ms in kept_ts], *(bulks(col) for col in encoded)]
            parts: list[bytes] = []
            calls = 0
            for lo in range(0, len(keys), _WRITE_CHUNK):
                hi = min(lo + _WRITE_CHUNK, len(keys))
                m = hi - lo
                # EVALSHA sha numkeys, m keys, the fixed arguments, (3 + F) per row.
                n_args = 3 + m + len(fixed) + m * (3 + len(field_keys))
                parts.append(b"*%d\r\n$7\r\nEVALSHA\r\n%s" % (n_args, sha_bulk))
                parts.append(_bulk(b"%d" % m))
                parts.extend(key_bulks[lo:hi])
                parts.append(fixed_args)
                parts.extend(chain.from_iterable(zip(*(c[lo:hi] for c in row_bulks), strict=True)))
                calls += 1
            replies = self._raw.round_trip(b"".join(parts), calls)
            for r in replies:
                if isinstance(r, Exception):
                    text = str(r)
                    if text.startswith("NOSCRIPT"):
                        raise NoScriptError(text)
                    raise reply_error(r)
            return replies

        run: Callable[[str], list[Any]] = run_raw if self._raw is not None else run_pipeline
        if self._cluster is not None:
            run = partial(
                self._cluster.write_many,
                keys=keys,
                kept_ts=kept_ts,
                encoded=encoded,
                field_keys=field_keys,
                ts_field=ts_name,
                ttl=ttl,
            )

        from redis.exceptions import NoScriptError, RedisError

        sha = self._sha or self._load_script()
        try:
            try:
                results = run(sha)
            except NoScriptError:
                # Redis restarted or SCRIPT FLUSH: reload and replay (the script is idempotent).
                logger.info("write script missing on the server; reloading it")
                results = run(self._load_script())
        except RedisError as exc:
            raise OnlineWriteError(view, len(keys), str(exc)) from exc
        written = sum(int(r) for r in results)
        logger.debug("wrote %d of %d rows to %s", written, n, view)
        return written

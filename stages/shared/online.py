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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Protocol, cast

import mmh3
import numpy as np

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


def decode_column(raws: Sequence[bytes | None]) -> np.ndarray:
    """Decode one feature's serialized Values for many rows to float64 (NaN where null).

    The common case (every value a ``double``) is one ``frombuffer``; other rows are fixed up.
    """
    n = len(raws)
    filler = b"\x00" * 9
    joined = b"".join(r if r is not None and len(r) == 9 else filler for r in raws)
    records = np.frombuffer(joined, dtype=_DOUBLE_RECORD, count=n)
    out = records["val"].astype(np.float64, copy=True)
    is_double = records["tag"] == _TAG_DOUBLE
    if is_double.all():
        return out
    for i in np.flatnonzero(~is_double).tolist():
        out[i] = decode_value(raws[i])
    return out


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
        out = [tag + _encode_varint(v) for v in ints.tolist()]
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


@dataclass(frozen=True, slots=True)
class _ViewRead:
    view: str
    join_key: str
    fields: tuple[bytes, ...]  # requested feature fields, then the _ts field
    columns: tuple[int, ...]  # output column of each requested feature


class OnlineFeatureReader:
    """Serves a feature service for a whole micro-batch in one pipelined round trip.

    Args:
        redis_client: a redis-py client (or anything meeting :class:`RedisClient`).
        store_or_layout: an open Feast store (its registry is read once, here) or a layout.
        feature_service_name: the feature service to serve, e.g. ``fraud_model_v1``.
        full_feature_names: name columns ``view__feature`` instead of ``feature``.

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

        # One key list per join key (views of the same entity share the hash), deduplicated.
        uniques: dict[str, tuple[list[bytes], np.ndarray]] = {}
        for key, arr in arrays.items():
            uniq, inverse = np.unique(arr, return_inverse=True)
            uniques[key] = (redis_keys(key, self._layout.project, uniq), inverse)

        pipe = self._client.pipeline(transaction=False)
        try:
            for read in self._reads:
                fields = read.fields
                for rkey in uniques[read.join_key][0]:
                    pipe.hmget(rkey, fields)
            replies: list[Any] = pipe.execute()
        finally:
            pipe.reset()

        values = np.full((n, len(self.feature_names)), np.nan, dtype=np.float64)
        event_ts: dict[str, np.ndarray] = {}
        found: dict[str, np.ndarray] = {}
        offset = 0
        for read in self._reads:
            rkeys, inverse = uniques[read.join_key]
            m = len(rkeys)
            rows = replies[offset : offset + m]
            offset += m
            if m == 0:
                event_ts[read.view] = np.zeros(n, dtype=np.int64)
                found[read.view] = np.zeros(n, dtype=bool)
                continue
            cols = list(zip(*rows, strict=True))
            ts_raw = cols[-1]
            ts_u = np.fromiter((decode_timestamp_ms(t) for t in ts_raw), dtype=np.int64, count=m)
            found_u = np.fromiter((t is not None for t in ts_raw), dtype=bool, count=m)
            decoded = np.empty((m, len(read.columns)), dtype=np.float64)
            for j in range(len(read.columns)):
                decoded[:, j] = decode_column(cast("Sequence[bytes | None]", cols[j]))
            values[:, read.columns[0] : read.columns[-1] + 1] = decoded[inverse]
            event_ts[read.view] = ts_u[inverse]
            found[read.view] = found_u[inverse]
        return OnlineBatch(
            values=values, event_ts_ms=event_ts, found=found, feature_names=self.feature_names
        )


# ------------------------------------------------------------------------------------------
# Writer

# KEYS[1]: entity hash. ARGV: ts field, new seconds, new nanos, new ts proto, ttl seconds (0 =
# none), then feature field/value pairs. Writes only if the stored _ts is absent or strictly
# older, exactly Feast's rule (equal timestamps are skipped), so replays are no-ops.
_WRITE_IF_NEWER: Final = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur and #cur > 0 then
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
  local ns, nn = tonumber(ARGV[2]), tonumber(ARGV[3])
  if ns < s or (ns == s and nn <= n) then return 0 end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[4], unpack(ARGV, 6))
local ttl = tonumber(ARGV[5])
if ttl > 0 then redis.call('EXPIRE', KEYS[1], ttl) end
return 1
"""


class OnlineFeatureWriter:
    """Idempotent batched writes of feature rows into Feast's Redis layout.

    One pipeline of ``EVALSHA`` calls (one per entity) per batch; the script compares event
    times server-side, so concurrent writers and replays never move a row back in time.

    Args:
        redis_client: a redis-py client (or anything meeting :class:`RedisClient`).
        layout: the project's layout (:meth:`OnlineLayout.from_store`).
    """

    def __init__(self, redis_client: RedisClient, layout: OnlineLayout) -> None:
        self._client = redis_client
        self._layout = layout
        self._sha: str | None = None
        self._ttl = int(layout.key_ttl_seconds or 0)

    def _load_script(self) -> str:
        sha = self._client.script_load(_WRITE_IF_NEWER)
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

        def run(sha: str) -> list[Any]:
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

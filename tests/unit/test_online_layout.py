"""Pure parts of the online layout: byte-for-byte agreement with Feast's own encoders."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest
from feast.infra.key_encoding_utils import serialize_entity_key
from feast.infra.online_stores.helpers import _mmh3, _redis_key
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from feast.type_map import python_values_to_proto_values
from feast.value_type import ValueType
from google.protobuf.timestamp_pb2 import Timestamp

from stages.shared.online.codec import (
    decode_column,
    decode_timestamp_ms,
    decode_value,
    encode_column,
    encode_timestamp_ms,
)
from stages.shared.online.errors import FeatureLayoutError
from stages.shared.online.keys import entity_key_prefix, field_key, redis_keys, ts_field
from stages.shared.online.layout import OnlineLayout, ViewLayout
from stages.shared.online.reader import OnlineFeatureReader
from stages.shared.schemas import CUSTOMER_FEATURES, CUSTOMER_VIEW, TERMINAL_FEATURES, TERMINAL_VIEW

IDS = np.array([0, 1, 127, 128, 2**31, 2**53 - 1, -1, -(2**63), 2**63 - 1], dtype=np.int64)


def _feast_key(join_key: str, value: int, project: str) -> bytes:
    proto = EntityKeyProto(join_keys=[join_key], entity_values=[ValueProto(int64_val=value)])
    return _redis_key(project, proto, entity_key_serialization_version=3)


def test_redis_keys_match_feast_serialize_entity_key() -> None:
    keys = redis_keys("customer_id", "rtpipe", IDS)
    assert keys == [_feast_key("customer_id", int(v), "rtpipe") for v in IDS]


def test_entity_key_prefix_is_feast_serialization_without_value_bytes() -> None:
    proto = EntityKeyProto(join_keys=["terminal_id"], entity_values=[ValueProto(int64_val=5)])
    full = serialize_entity_key(proto, entity_key_serialization_version=3)
    assert full == entity_key_prefix("terminal_id") + (5).to_bytes(8, "little")


def test_redis_keys_empty_and_other_int_dtypes() -> None:
    assert redis_keys("customer_id", "p", np.array([], dtype=np.int64)) == []
    small = np.array([3, 4], dtype=np.int32)
    assert redis_keys("customer_id", "p", small) == [
        _feast_key("customer_id", 3, "p"),
        _feast_key("customer_id", 4, "p"),
    ]


@pytest.mark.parametrize("feature", [*CUSTOMER_FEATURES, *TERMINAL_FEATURES])
def test_field_keys_match_feast_mmh3(feature: str) -> None:
    view = CUSTOMER_VIEW if feature.startswith("customer") else TERMINAL_VIEW
    assert field_key(view, feature) == _mmh3(f"{view}:{feature}")
    assert ts_field(view) == f"_ts:{view}".encode()


def _proto_bytes(values: list[Any], vt: ValueType) -> list[bytes]:
    return [v.SerializeToString() for v in python_values_to_proto_values(values, vt)]


def test_encode_float64_matches_feast_including_nan() -> None:
    values = np.array([0.0, -1.5, 1e300, np.nan, 3.25, -0.0])
    assert encode_column("Float64", values) == _proto_bytes(values.tolist(), ValueType.DOUBLE)


def test_encode_int64_matches_feast_including_negative_and_nan() -> None:
    ints = [0, 1, 127, 128, 300, 2**40, -1, -(2**63)]
    assert encode_column("Int64", np.array(ints)) == _proto_bytes(ints, ValueType.INT64)
    with_nan = np.array([3.0, np.nan, 128.0])
    assert encode_column("Int64", with_nan) == [b" \x03", b"", b" \x80\x01"]


@pytest.mark.parametrize(
    "proto",
    [
        ValueProto(double_val=2.5),
        ValueProto(double_val=0.0),
        ValueProto(int64_val=0),
        ValueProto(int64_val=5),
        ValueProto(int64_val=1 << 40),
        ValueProto(int64_val=-7),
        ValueProto(int32_val=-3),
        ValueProto(float_val=1.5),
        ValueProto(bool_val=True),
        ValueProto(),
    ],
)
def test_decode_value_matches_proto(proto: ValueProto) -> None:
    which = proto.WhichOneof("val")
    expected = float(getattr(proto, which)) if which else float("nan")
    got = decode_value(proto.SerializeToString())
    assert got == expected or (np.isnan(got) and np.isnan(expected))


def test_decode_value_rejects_strings() -> None:
    with pytest.raises(FeatureLayoutError):
        decode_value(ValueProto(string_val="x").SerializeToString())


def test_decode_column_mixes_doubles_ints_nulls_and_absent() -> None:
    raws: list[bytes | None] = [
        ValueProto(double_val=1.25).SerializeToString(),
        None,
        b"",
        ValueProto(int64_val=2**60).SerializeToString(),  # 9 bytes long, not a double
        ValueProto(int64_val=3).SerializeToString(),
        ValueProto(double_val=-2.0).SerializeToString(),
    ]
    got = decode_column(raws)
    np.testing.assert_array_equal(got, [1.25, np.nan, np.nan, float(2**60), 3.0, -2.0])
    assert decode_column([]).shape == (0,)


@pytest.mark.parametrize(
    "when",
    [
        datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC),
        datetime(2025, 3, 1, 12, 0, 0, 7000, tzinfo=UTC),
        datetime(2025, 3, 1, 12, 0, 0, 999000, tzinfo=UTC),
        datetime(1970, 1, 1, 0, 0, 0, 1000, tzinfo=UTC),
        datetime(1970, 1, 1, tzinfo=UTC),
    ],
)
def test_timestamps_match_feast_from_datetime(when: datetime) -> None:
    ts = Timestamp()
    ts.FromDatetime(when)  # what Feast's online_write_batch stores
    ms = (when - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)
    assert encode_timestamp_ms(ms) == ts.SerializeToString()
    assert decode_timestamp_ms(ts.SerializeToString()) == ms


def test_decode_timestamp_truncates_sub_millisecond_and_absent_is_zero() -> None:
    ts = Timestamp(seconds=1_700_000_000, nanos=123_456_789)
    assert decode_timestamp_ms(ts.SerializeToString()) == 1_700_000_000_123
    assert decode_timestamp_ms(None) == 0
    assert decode_timestamp_ms(b"") == 0


# --- reader against a fake client: one round trip, deduplicated keys, output assembly ---


def _layout() -> OnlineLayout:
    views = {
        CUSTOMER_VIEW: ViewLayout(
            CUSTOMER_VIEW, "customer_id", ("c_n", "c_avg"), ("Int64", "Float64")
        ),
        TERMINAL_VIEW: ViewLayout(TERMINAL_VIEW, "terminal_id", ("t_risk",), ("Float64",)),
    }
    services = {"svc": ((CUSTOMER_VIEW, ("c_avg", "c_n")), (TERMINAL_VIEW, ("t_risk",)))}
    return OnlineLayout(project="p", views=views, services=services)


class FakePipeline:
    def __init__(self, store: dict[bytes, dict[bytes, bytes]], log: list[str]) -> None:
        self._store = store
        self._log = log
        self._queued: list[tuple[bytes, tuple[bytes, ...]]] = []

    def hmget(self, name: bytes, keys: Any, *args: Any) -> Any:
        self._queued.append((name, tuple(keys)))
        return self

    def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any:
        raise NotImplementedError

    def execute(self, raise_on_error: bool = True) -> list[Any]:
        self._log.append(f"execute:{len(self._queued)}")
        out = [[self._store.get(k, {}).get(f) for f in fields] for k, fields in self._queued]
        self._queued = []
        return out

    def reset(self) -> None:
        self._queued = []


class FakeRedis:
    def __init__(self) -> None:
        self.store: dict[bytes, dict[bytes, bytes]] = {}
        self.log: list[str] = []

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> FakePipeline:
        return FakePipeline(self.store, self.log)

    def script_load(self, script: str) -> Any:
        raise NotImplementedError


def test_reader_one_round_trip_dedup_and_service_order() -> None:
    layout = _layout()
    fake = FakeRedis()
    cview, tview = layout.views[CUSTOMER_VIEW], layout.views[TERMINAL_VIEW]
    (ckey,) = redis_keys("customer_id", "p", np.array([7]))
    fake.store[ckey] = {
        cview.field_keys[0]: ValueProto(int64_val=4).SerializeToString(),
        cview.field_keys[1]: ValueProto(double_val=9.5).SerializeToString(),
        cview.ts_field: encode_timestamp_ms(1_700_000_000_250),
    }
    (tkey,) = redis_keys("terminal_id", "p", np.array([3]))
    # Another view of the same hash only: terminal_risk absent for this entity.
    fake.store[tkey] = {b"_ts:other": encode_timestamp_ms(5)}
    assert tview.ts_field not in fake.store[tkey]

    reader = OnlineFeatureReader(fake, layout, "svc")
    batch = reader.read(
        {"customer_id": np.array([7, 8, 7, 7]), "terminal_id": np.array([3, 3, 3, 1])}
    )
    # 2 unique customers + 2 unique terminals, one execute.
    assert fake.log == ["execute:4"]
    assert batch.feature_names == ("c_avg", "c_n", "t_risk")
    np.testing.assert_array_equal(
        batch.values,
        [[9.5, 4.0, np.nan], [np.nan, np.nan, np.nan], [9.5, 4.0, np.nan], [9.5, 4.0, np.nan]],
    )
    np.testing.assert_array_equal(
        batch.event_ts_ms[CUSTOMER_VIEW],
        [1_700_000_000_250, 0, 1_700_000_000_250, 1_700_000_000_250],
    )
    np.testing.assert_array_equal(batch.found[CUSTOMER_VIEW], [True, False, True, True])
    np.testing.assert_array_equal(batch.found[TERMINAL_VIEW], [False] * 4)
    assert batch.event_ts_ms[TERMINAL_VIEW].dtype == np.int64


def test_reader_empty_batch_and_bad_input() -> None:
    reader = OnlineFeatureReader(FakeRedis(), _layout(), "svc")
    empty = reader.read(
        {"customer_id": np.array([], np.int64), "terminal_id": np.array([], np.int64)}
    )
    assert empty.values.shape == (0, 3)
    with pytest.raises(FeatureLayoutError):
        reader.read({"customer_id": np.array([1])})
    with pytest.raises(FeatureLayoutError):
        reader.read({"customer_id": np.array([1, 2]), "terminal_id": np.array([1])})
    with pytest.raises(FeatureLayoutError):
        reader.read({"customer_id": np.array([1.0]), "terminal_id": np.array([1])})


def test_layout_rejects_unknown_service_dtype_and_version() -> None:
    with pytest.raises(FeatureLayoutError):
        OnlineFeatureReader(FakeRedis(), _layout(), "nope")
    with pytest.raises(FeatureLayoutError):
        ViewLayout("v", "id", ("s",), ("String",))
    with pytest.raises(FeatureLayoutError):
        OnlineLayout(project="p", views={}, services={}, entity_key_serialization_version=2)


def test_full_feature_names() -> None:
    reader = OnlineFeatureReader(FakeRedis(), _layout(), "svc", full_feature_names=True)
    assert reader.feature_names == (
        f"{CUSTOMER_VIEW}__c_avg",
        f"{CUSTOMER_VIEW}__c_n",
        f"{TERMINAL_VIEW}__t_risk",
    )


def test_raw_error_replies_become_redis_py_exceptions() -> None:
    # A restarted Redis answers LOADING while it reads its append-only file: transient, a
    # ConnectionError the stages back off from (as redis-py's own parser raises it).
    import redis

    from stages.shared.online.resp import reply_error

    loading = reply_error(Exception("LOADING Redis is loading the dataset in memory"))
    assert isinstance(loading, redis.ConnectionError)
    other = reply_error(Exception("WRONGTYPE Operation against a key"))
    assert isinstance(other, redis.ResponseError) and not isinstance(other, redis.ConnectionError)

"""Our Redis fast path against Feast's own SDK on real Redis: same bytes, same answers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stages.shared.online.keys import redis_keys
from stages.shared.online.layout import OnlineLayout
from stages.shared.online.reader import OnlineFeatureReader
from stages.shared.online.writer import OnlineFeatureWriter
from stages.shared.schemas import (
    BEHAVIOUR_FEATURES,
    BEHAVIOUR_VIEW,
    CUSTOMER_FEATURES,
    CUSTOMER_VIEW,
    TERMINAL_FEATURES,
    TERMINAL_VIEW,
)
from stages.shared.settings import Settings
from tests.online_support import (
    SERVICE,
    T0_MS,
    FeastProject,
    assert_batch_is_feasts,
    feast_online,
    feast_project,
    random_frame,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def env(stack_settings: Settings, tmp_path: Path) -> Iterator[FeastProject]:
    """A private repo copy, applied under a unique project; its Redis keys dropped after."""
    with feast_project(stack_settings, tmp_path) as project:
        yield project


def assert_same_as_feast(env: FeastProject, customers: np.ndarray, terminals: np.ndarray) -> None:
    reader = OnlineFeatureReader(env.client, env.store, SERVICE)
    batch = reader.read({"customer_id": customers, "terminal_id": terminals})
    assert_batch_is_feasts(batch, env.store, customers, terminals)


def test_reader_matches_feast_for_present_missing_and_partial_entities(env: FeastProject) -> None:
    rng = np.random.default_rng(7)
    customers_written = np.arange(0, 200, dtype=np.int64)
    terminals_written = np.arange(0, 100, dtype=np.int64)
    env.store.push(
        "customer_spending_push",
        random_frame(rng, CUSTOMER_VIEW, customers_written, T0_MS + rng.integers(0, 10**9, 200)),
    )
    env.store.push(
        "terminal_risk_push",
        random_frame(rng, TERMINAL_VIEW, terminals_written, T0_MS + rng.integers(0, 10**9, 100)),
    )
    # Terminals 100..199 share ids with written customers but were never written: their hash
    # is absent; customer ids 200..299 are absent. Repeats exercise deduplication.
    customers = rng.integers(0, 300, 500)
    terminals = rng.integers(0, 200, 500)
    assert_same_as_feast(env, customers, terminals)
    # A partially written entity: terminal 150 written, then read next to absent customers.
    assert_same_as_feast(env, np.array([250, 5]), np.array([150, 150]))


def test_writer_output_is_what_feast_reads(env: FeastProject) -> None:
    rng = np.random.default_rng(11)
    writer = OnlineFeatureWriter(env.client, env.layout)
    ids = np.arange(1000, 1300, dtype=np.int64)
    ts = T0_MS + rng.integers(0, 10**9, len(ids))
    frame = random_frame(rng, CUSTOMER_VIEW, ids, ts)
    written = writer.write(
        CUSTOMER_VIEW, ids, {f: frame[f].to_numpy() for f in CUSTOMER_FEATURES}, ts
    )
    assert written == len(ids)
    expected, expected_ts = feast_online(env.store, ids, ids)
    for name in CUSTOMER_FEATURES:
        np.testing.assert_array_equal(frame[name].to_numpy(dtype=float), expected[name])
    np.testing.assert_array_equal(expected_ts[CUSTOMER_VIEW], ts)
    assert_same_as_feast(env, ids, ids)


def test_v2_two_customer_views_in_one_hash_are_what_feast_reads(env: FeastProject) -> None:
    # fraud_model_v2: the spending and behaviour views share each customer's Redis hash,
    # each with its own event time; some customers have only the spending row.
    rng = np.random.default_rng(13)
    writer = OnlineFeatureWriter(env.client, env.layout)
    ids = np.arange(2000, 2100, dtype=np.int64)
    ts = T0_MS + rng.integers(0, 10**9, len(ids))
    spending = random_frame(rng, CUSTOMER_VIEW, ids, ts)
    writer.write(CUSTOMER_VIEW, ids, {f: spending[f].to_numpy() for f in CUSTOMER_FEATURES}, ts)
    some = ids[::2]
    behaviour = {
        f: (rng.integers(1, 9, len(some)) if "nb_" in f else rng.uniform(0, 5, len(some)))
        for f in BEHAVIOUR_FEATURES
    }
    writer.write(BEHAVIOUR_VIEW, some, behaviour, ts[::2] + 1)
    reader = OnlineFeatureReader(env.client, env.store, "fraud_model_v2")
    assert reader.feature_names == (*CUSTOMER_FEATURES, *TERMINAL_FEATURES, *BEHAVIOUR_FEATURES)
    batch = reader.read({"customer_id": ids, "terminal_id": ids})
    expected, expected_ts = feast_online(env.store, ids, ids, "fraud_model_v2")
    for j, name in enumerate(batch.feature_names):
        np.testing.assert_array_equal(batch.values[:, j], expected[name], err_msg=name)
    for view in (CUSTOMER_VIEW, TERMINAL_VIEW, BEHAVIOUR_VIEW):
        np.testing.assert_array_equal(batch.event_ts_ms[view], expected_ts[view], err_msg=view)
    assert batch.found[BEHAVIOUR_VIEW].tolist() == [True, False] * 50
    col = batch.feature_names.index("customer_nb_terminals_7d")
    np.testing.assert_array_equal(batch.values[::2, col], behaviour["customer_nb_terminals_7d"])


def test_a_write_spanning_several_script_calls_is_what_feast_reads(env: FeastProject) -> None:
    # 2,500 rows: three batched script calls (1,000 rows each at most) in one round trip,
    # with some entities already holding newer rows that must survive.
    rng = np.random.default_rng(12)
    writer = OnlineFeatureWriter(env.client, env.layout)
    ids = np.arange(20_000, 22_500, dtype=np.int64)
    newer = ids[::7]
    writer.write(
        CUSTOMER_VIEW,
        newer,
        {f: np.full(len(newer), 99.0) for f in CUSTOMER_FEATURES},
        np.full(len(newer), T0_MS + 10**10),
    )
    ts = T0_MS + rng.integers(0, 10**9, len(ids))
    frame = random_frame(rng, CUSTOMER_VIEW, ids, ts)
    written = writer.write(
        CUSTOMER_VIEW, ids, {f: frame[f].to_numpy() for f in CUSTOMER_FEATURES}, ts
    )
    assert written == len(ids) - len(newer)
    expected, expected_ts = feast_online(env.store, ids, ids)
    kept = ~np.isin(ids, newer)
    for name in CUSTOMER_FEATURES:
        got = np.asarray(expected[name])
        np.testing.assert_array_equal(frame[name].to_numpy(dtype=float)[kept], got[kept])
        assert (got[~kept] == 99.0).all()
    np.testing.assert_array_equal(expected_ts[CUSTOMER_VIEW][kept], ts[kept])
    assert_same_as_feast(env, ids, ids)


def test_clients_without_the_raw_path_write_and_read_the_same(env: FeastProject) -> None:
    # A RESP3 client is not served by the raw RESP path: one pipelined per-entity script
    # call and pipelined HMGETs, against the same Redis.
    resp3 = env.settings.redis.client(protocol=3)
    writer = OnlineFeatureWriter(resp3, env.layout)
    assert writer._transport.kind == "pipeline"
    rng = np.random.default_rng(13)
    ids = np.arange(30_000, 30_200, dtype=np.int64)
    ts = T0_MS + rng.integers(0, 10**9, len(ids))
    frame = random_frame(rng, CUSTOMER_VIEW, ids, ts)
    values = {f: frame[f].to_numpy() for f in CUSTOMER_FEATURES}
    assert writer.write(CUSTOMER_VIEW, ids, values, ts) == len(ids)
    # Replayed and older rows are skipped by this script too.
    assert writer.write(CUSTOMER_VIEW, ids, values, ts) == 0
    assert writer.write(CUSTOMER_VIEW, ids, values, ts - 1) == 0
    expected, expected_ts = feast_online(env.store, ids, ids)
    for name in CUSTOMER_FEATURES:
        np.testing.assert_array_equal(frame[name].to_numpy(dtype=float), expected[name])
    np.testing.assert_array_equal(expected_ts[CUSTOMER_VIEW], ts)
    reader = OnlineFeatureReader(resp3, env.layout, SERVICE)
    batch = reader.read({"customer_id": ids, "terminal_id": ids})
    np.testing.assert_array_equal(batch.event_ts_ms[CUSTOMER_VIEW], ts)


def test_writer_and_feast_push_write_identical_bytes(env: FeastProject) -> None:
    rng = np.random.default_rng(3)
    ts = np.array([T0_MS, T0_MS + 1, T0_MS + 999], dtype=np.int64)
    frame = random_frame(rng, TERMINAL_VIEW, np.array([1, 2, 3]), ts)
    env.store.push("terminal_risk_push", frame)
    ours = frame.assign(terminal_id=frame["terminal_id"] + 100)
    OnlineFeatureWriter(env.client, env.layout).write(
        TERMINAL_VIEW,
        ours["terminal_id"].to_numpy(),
        {f: ours[f].to_numpy() for f in TERMINAL_FEATURES},
        ts,
    )
    project = env.settings.feast_project
    feast_keys = redis_keys("terminal_id", project, np.array([1, 2, 3]))
    our_keys = redis_keys("terminal_id", project, np.array([101, 102, 103]))
    for fk, ok in zip(feast_keys, our_keys, strict=True):
        assert env.client.hgetall(fk) == env.client.hgetall(ok)


def read_one(env: FeastProject, customer: int) -> tuple[np.ndarray, int]:
    reader = OnlineFeatureReader(env.client, env.layout, SERVICE)
    batch = reader.read({"customer_id": np.array([customer]), "terminal_id": np.array([0])})
    return batch.values[0, : len(CUSTOMER_FEATURES)], int(batch.event_ts_ms[CUSTOMER_VIEW][0])


def const_values(value: float, n: int = 1) -> dict[str, np.ndarray]:
    return {f: np.full(n, value) for f in CUSTOMER_FEATURES}


def test_older_never_overwrites_newer_and_replays_are_noops(env: FeastProject) -> None:
    writer = OnlineFeatureWriter(env.client, env.layout)
    one = np.array([42])
    assert writer.write(CUSTOMER_VIEW, one, const_values(2.0), np.array([T0_MS + 10])) == 1
    (key,) = redis_keys("customer_id", env.settings.feast_project, one)
    before = env.client.hgetall(key)
    # Same write again: no-op, byte for byte.
    assert writer.write(CUSTOMER_VIEW, one, const_values(2.0), np.array([T0_MS + 10])) == 0
    # Same event time, other values: Feast's rule skips equal timestamps too.
    assert writer.write(CUSTOMER_VIEW, one, const_values(9.0), np.array([T0_MS + 10])) == 0
    # Older: skipped, by us and by Feast's own push.
    assert writer.write(CUSTOMER_VIEW, one, const_values(1.0), np.array([T0_MS + 9])) == 0
    older = pd.DataFrame({"customer_id": one, **const_values(1.0)})
    older["event_timestamp"] = pd.to_datetime([T0_MS + 9], unit="ms", utc=True)
    older["created_timestamp"] = older["event_timestamp"]
    env.store.push("customer_spending_push", older)
    assert env.client.hgetall(key) == before
    # Newer, by Feast: applied, and then our older replay is skipped.
    newer = older.assign(event_timestamp=pd.to_datetime([T0_MS + 20], unit="ms", utc=True))
    env.store.push("customer_spending_push", newer)
    values, ts = read_one(env, 42)
    assert ts == T0_MS + 20 and (values == 1.0).all()
    assert writer.write(CUSTOMER_VIEW, one, const_values(2.0), np.array([T0_MS + 10])) == 0
    assert read_one(env, 42)[1] == T0_MS + 20


def test_newest_row_per_entity_wins_within_a_call(env: FeastProject) -> None:
    writer = OnlineFeatureWriter(env.client, env.layout)
    ids = np.array([7, 7, 8, 7, 8, 8])
    ts = np.array([5, 30, 10, 20, 10, 9]) + T0_MS
    vals = const_values(0.0, 6)
    for f in CUSTOMER_FEATURES:
        vals[f] = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    assert writer.write(CUSTOMER_VIEW, ids, vals, ts) == 2
    assert read_one(env, 7) == (pytest.approx([2.0] * 6), T0_MS + 30)
    # Ties keep the first row, as Feast does.
    assert read_one(env, 8)[0].tolist() == [3.0] * 6


def test_ttl_matches_feast_key_ttl_seconds(env: FeastProject) -> None:
    env.store.config.online_store.key_ttl_seconds = 3600
    layout = OnlineLayout.from_store(env.store)
    assert layout.key_ttl_seconds == 3600
    frame = pd.DataFrame({"customer_id": np.array([1]), **const_values(1.0)})
    frame["event_timestamp"] = pd.to_datetime([T0_MS], unit="ms", utc=True)
    frame["created_timestamp"] = frame["event_timestamp"]
    env.store.push("customer_spending_push", frame)
    OnlineFeatureWriter(env.client, layout).write(
        CUSTOMER_VIEW, np.array([2]), const_values(1.0), np.array([T0_MS])
    )
    feast_key, our_key = redis_keys("customer_id", env.settings.feast_project, np.array([1, 2]))
    assert 3500 < env.client.ttl(feast_key) <= 3600
    assert 3500 < env.client.ttl(our_key) <= 3600
    # Without the option, neither sets an expiry.
    OnlineFeatureWriter(env.client, env.layout).write(
        CUSTOMER_VIEW, np.array([3]), const_values(1.0), np.array([T0_MS])
    )
    (plain,) = redis_keys("customer_id", env.settings.feast_project, np.array([3]))
    assert env.client.ttl(plain) == -1


def test_writer_reloads_script_after_script_flush(env: FeastProject) -> None:
    writer = OnlineFeatureWriter(env.client, env.layout)
    assert writer.write(CUSTOMER_VIEW, np.array([1]), const_values(1.0), np.array([T0_MS])) == 1
    env.client.script_flush()
    assert writer.write(CUSTOMER_VIEW, np.array([1]), const_values(2.0), np.array([T0_MS + 1])) == 1
    assert read_one(env, 1)[1] == T0_MS + 1

"""The online reader and writer on a real Redis Cluster, against Feast's own ``redis_cluster``
online store: same bytes, same answers, the newer row kept, one script call per node."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from feast import FeatureStore

from stages.shared.feast_store import repo_config
from stages.shared.online.cluster import ClusterRawRedis
from stages.shared.online.layout import OnlineLayout
from stages.shared.online.reader import OnlineFeatureReader
from stages.shared.online.writer import OnlineFeatureWriter
from stages.shared.schemas import CUSTOMER_FEATURES, CUSTOMER_VIEW, TERMINAL_FEATURES, TERMINAL_VIEW
from stages.shared.settings import Settings
from tests.online_support import (
    SERVICE,
    T0_MS,
    assert_batch_is_feasts,
    feast_online,
    feast_project,
    random_frame,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def env(redis_cluster: Settings, tmp_path: Path) -> Iterator[tuple[Settings, FeatureStore, Any]]:
    """A private repo copy applied under a unique project; its keys dropped after."""
    with feast_project(redis_cluster, tmp_path) as project:
        yield project.settings, project.store, project.client


def evalsha_calls(client: Any) -> dict[str, int]:
    """EVALSHA calls served so far, per primary."""
    out = {}
    for node in client.get_primaries():
        stats = node.redis_connection.info("commandstats")
        out[node.name] = int(stats.get("cmdstat_evalsha", {}).get("calls", 0))
    return out


def test_feast_config_is_redis_cluster(env: tuple[Settings, FeatureStore, Any]) -> None:
    settings, _store, client = env
    online = repo_config(settings).online_store
    assert online.redis_type == "redis_cluster"
    assert ClusterRawRedis.supports(client)
    assert len(client.get_primaries()) == 3


def test_writer_then_reader_match_feast_on_the_cluster(
    env: tuple[Settings, FeatureStore, Any],
) -> None:
    _, store, client = env
    rng = np.random.default_rng(3)
    layout = OnlineLayout.from_store(store)
    writer = OnlineFeatureWriter(client, layout)
    customers_w = np.arange(0, 600, dtype=np.int64)
    terminals_w = np.arange(0, 300, dtype=np.int64)
    cf = random_frame(rng, CUSTOMER_VIEW, customers_w, T0_MS + rng.integers(0, 10**9, 600))
    tf = random_frame(rng, TERMINAL_VIEW, terminals_w, T0_MS + rng.integers(0, 10**9, 300))
    before = evalsha_calls(client)
    assert writer.write(
        CUSTOMER_VIEW,
        customers_w,
        {f: cf[f].to_numpy() for f in CUSTOMER_FEATURES},
        (cf["event_timestamp"].astype("int64") // 10**6).to_numpy(),
    ) == len(customers_w)
    after = evalsha_calls(client)
    # One batched script call per primary for 600 rows spread over every primary.
    assert {n: after[n] - before[n] for n in after} == dict.fromkeys(after, 1)
    assert writer.write(
        TERMINAL_VIEW,
        terminals_w,
        {f: tf[f].to_numpy() for f in TERMINAL_FEATURES},
        (tf["event_timestamp"].astype("int64") // 10**6).to_numpy(),
    ) == len(terminals_w)
    # Every primary holds part of the rows.
    assert all(n.redis_connection.dbsize() > 0 for n in client.get_primaries())

    # Present, absent (customers 600.., terminals 300..) and repeated entities.
    customers = rng.integers(0, 800, 700)
    terminals = rng.integers(0, 400, 700)
    batch = OnlineFeatureReader(client, store, SERVICE).read(
        {"customer_id": customers, "terminal_id": terminals}
    )
    assert_batch_is_feasts(batch, store, customers, terminals)
    # A handful of rows (the reader's scalar decoding path) agrees too.
    small = OnlineFeatureReader(client, store, SERVICE).read(
        {"customer_id": customers[:3], "terminal_id": terminals[:3]}
    )
    np.testing.assert_array_equal(small.values, batch.values[:3])


def test_rows_pushed_by_feast_are_read_and_newer_rows_are_kept(
    env: tuple[Settings, FeatureStore, Any],
) -> None:
    _, store, client = env
    rng = np.random.default_rng(5)
    ids = np.arange(5_000, 6_200, dtype=np.int64)  # 1,200 rows: two calls on some primary
    # Feast's own cluster client writes a newer row for every 5th entity first.
    newer = ids[::5]
    newer_frame = random_frame(rng, CUSTOMER_VIEW, newer, np.full(len(newer), T0_MS + 10**10))
    store.push("customer_spending_push", newer_frame)
    writer = OnlineFeatureWriter(client, OnlineLayout.from_store(store))
    ts = T0_MS + rng.integers(0, 10**9, len(ids))
    older = random_frame(rng, CUSTOMER_VIEW, ids, ts)
    written = writer.write(
        CUSTOMER_VIEW, ids, {f: older[f].to_numpy() for f in CUSTOMER_FEATURES}, ts
    )
    assert written == len(ids) - len(newer)
    # Replaying the same rows writes nothing (compare-and-set, equal times skipped).
    assert (
        writer.write(CUSTOMER_VIEW, ids, {f: older[f].to_numpy() for f in CUSTOMER_FEATURES}, ts)
        == 0
    )

    expected, expected_ts = feast_online(store, ids, ids)
    kept = ~np.isin(ids, newer)
    np.testing.assert_array_equal(expected_ts[CUSTOMER_VIEW][kept], ts[kept])
    np.testing.assert_array_equal(expected_ts[CUSTOMER_VIEW][~kept], T0_MS + 10**10)
    batch = OnlineFeatureReader(client, store, SERVICE).read(
        {"customer_id": ids, "terminal_id": ids}
    )
    for name in CUSTOMER_FEATURES:
        got = batch.values[:, batch.feature_names.index(name)]
        np.testing.assert_array_equal(got, expected[name], err_msg=name)
        np.testing.assert_array_equal(
            got[kept], older[name].to_numpy(dtype=float)[kept], err_msg=name
        )
        np.testing.assert_array_equal(
            got[~kept], newer_frame[name].to_numpy(dtype=float), err_msg=name
        )


def test_script_flushed_on_every_primary_is_reloaded(
    env: tuple[Settings, FeatureStore, Any],
) -> None:
    _, store, client = env
    writer = OnlineFeatureWriter(client, OnlineLayout.from_store(store))
    ids = np.arange(100, dtype=np.int64)
    values = {f: np.ones(len(ids)) for f in CUSTOMER_FEATURES}
    assert writer.write(CUSTOMER_VIEW, ids, values, np.full(len(ids), T0_MS)) == len(ids)
    for node in client.get_primaries():
        node.redis_connection.script_flush()
    assert writer.write(CUSTOMER_VIEW, ids, values, np.full(len(ids), T0_MS + 1)) == len(ids)

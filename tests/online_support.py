"""Helpers of the online store's tests against Feast's own SDK, on a single Redis and on a
Redis Cluster: a private applied Feast project, random rows of a view, and Feast's answer
for a batch, which the fast path must equal value for value."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from feast import FeatureStore

from stages.ops.harness.sandbox import clear_online_store, isolated_settings
from stages.shared.feast_store import apply_repo, open_feature_store
from stages.shared.online.layout import OnlineLayout
from stages.shared.online.reader import OnlineBatch
from stages.shared.schemas import CUSTOMER_FEATURES, CUSTOMER_VIEW, TERMINAL_FEATURES, TERMINAL_VIEW
from stages.shared.settings import Settings

SERVICE = "fraud_model_v1"
T0_MS = 1_750_000_000_123


@dataclass
class FeastProject:
    settings: Settings
    store: FeatureStore
    client: Any  # redis.Redis or RedisCluster; their stubs type keys as str, Feast's are bytes
    layout: OnlineLayout


@contextmanager
def feast_project(base: Settings, tmp: Path) -> Iterator[FeastProject]:
    """A private copy of the feature repo applied under a unique project on ``base``'s
    Redis; the project's online rows are dropped after."""
    settings = isolated_settings(base, tmp)
    apply_repo(settings)
    store = open_feature_store(settings)
    client = settings.redis.client()
    try:
        yield FeastProject(settings, store, client, OnlineLayout.from_store(store))
    finally:
        clear_online_store(settings)
        client.close()


def random_frame(
    rng: np.random.Generator, view: str, ids: np.ndarray, ts_ms: np.ndarray
) -> pd.DataFrame:
    """Rows of ``view`` for ``ids`` at ``ts_ms``, as Feast's push takes them: random counts
    and amounts, 10 % of the amounts null."""
    features = CUSTOMER_FEATURES if view == CUSTOMER_VIEW else TERMINAL_FEATURES
    join_key = "customer_id" if view == CUSTOMER_VIEW else "terminal_id"
    n = len(ids)
    data: dict[str, object] = {join_key: ids.astype(np.int64)}
    for name in features:
        if "nb_tx" in name:
            data[name] = rng.integers(0, 5000, n).astype(np.int64)
        else:
            col = rng.normal(50, 30, n)
            col[rng.random(n) < 0.1] = np.nan  # nulls are written as empty Values
            data[name] = col
    data["event_timestamp"] = pd.to_datetime(ts_ms, unit="ms", utc=True)
    data["created_timestamp"] = data["event_timestamp"]
    return pd.DataFrame(data)


def feast_online(
    store: FeatureStore, customers: np.ndarray, terminals: np.ndarray, service: str = SERVICE
) -> tuple[dict[str, list[float]], dict[str, np.ndarray]]:
    """Feast's answer for ``service``: values by feature name, and event-time ms by view."""
    response = store.get_online_features(
        features=store.get_feature_service(service),
        entity_rows=[
            {"customer_id": int(c), "terminal_id": int(t)}
            for c, t in zip(customers, terminals, strict=True)
        ],
        full_feature_names=True,
    )
    values: dict[str, list[float]] = {}
    ts: dict[str, np.ndarray] = {}
    names = list(response.proto.metadata.feature_names.val)
    for name, vector in zip(names, response.proto.results, strict=True):
        if "__" not in name:
            continue  # the join keys
        view, feature = name.split("__", 1)
        values[feature] = [
            float(getattr(v, v.WhichOneof("val"))) if v.WhichOneof("val") else np.nan
            for v in vector.values
        ]
        ts[view] = np.array(
            [t.seconds * 1000 + t.nanos // 1_000_000 for t in vector.event_timestamps]
        )
    return values, ts


def assert_batch_is_feasts(
    batch: OnlineBatch, store: FeatureStore, customers: np.ndarray, terminals: np.ndarray
) -> None:
    """``batch`` (read for ``customers`` and ``terminals``) holds exactly Feast's answer:
    every value, every view's event time, and which views were found."""
    expected, expected_ts = feast_online(store, customers, terminals)
    assert batch.feature_names == (*CUSTOMER_FEATURES, *TERMINAL_FEATURES)
    for j, name in enumerate(batch.feature_names):
        np.testing.assert_array_equal(batch.values[:, j], expected[name], err_msg=name)
    for view in (CUSTOMER_VIEW, TERMINAL_VIEW):
        np.testing.assert_array_equal(batch.event_ts_ms[view], expected_ts[view], err_msg=view)
        np.testing.assert_array_equal(batch.found[view], expected_ts[view] > 0, err_msg=view)

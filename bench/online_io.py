"""Rows/s of the online fast path against Feast's SDK and a bare pipelined HMGET.

Usage (against a scratch Redis; the project's keys are deleted at the end)::

    redis-server --port 26391 --daemonize yes --save '' --appendonly no
    .venv/bin/python -m bench.online_io --redis-port 26391 --batch 500 --repeats 30
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from bench.online import BASE_MS, fill
from stages.ops.harness.sandbox import feast_project
from stages.shared.feast_store import open_feature_store
from stages.shared.online.layout import OnlineLayout
from stages.shared.online.reader import OnlineFeatureReader
from stages.shared.online.writer import OnlineFeatureWriter
from stages.shared.schemas import CUSTOMER_FEATURES, CUSTOMER_VIEW
from stages.shared.settings import RedisSettings, Settings

logger = logging.getLogger(__name__)


def _median_rows_per_s(fn: Callable[[int], object], rows: int, repeats: int) -> float:
    fn(0)  # warm-up
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        fn(i + 1)
        times.append(time.perf_counter() - start)
    return rows / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--redis-port", type=int, default=26391)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--entities", type=int, default=100_000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    base = Settings(redis=RedisSettings(port=args.redis_port))
    with feast_project(base) as settings:
        client = settings.redis.client()
        store = open_feature_store(settings)
        layout = OnlineLayout.from_store(store)
        writer = OnlineFeatureWriter(client, layout)
        reader = OnlineFeatureReader(client, layout, "fraud_model_v1")
        rng = np.random.default_rng(0)
        n, b = args.entities, args.batch
        # Fill both views for every entity with our writer.
        fill(writer, n)

        batches = [(rng.integers(0, n, b), rng.integers(0, n, b)) for _ in range(args.repeats + 1)]

        def ours(i: int) -> object:
            c, t = batches[i]
            return reader.read({"customer_id": c, "terminal_id": t})

        service = store.get_feature_service("fraud_model_v1")

        def feast(i: int) -> object:
            c, t = batches[i]
            rows = [
                {"customer_id": int(x), "terminal_id": int(y)} for x, y in zip(c, t, strict=True)
            ]
            return store.get_online_features(features=service, entity_rows=rows).to_dict()

        cv, tv = layout.views[CUSTOMER_VIEW], layout.views["terminal_risk"]
        cf, tf = (*cv.field_keys, cv.ts_field), (*tv.field_keys, tv.ts_field)

        def bare(i: int) -> object:
            c, t = batches[i]
            pipe: Any = client.pipeline(transaction=False)
            for k in layout.keys(CUSTOMER_VIEW, c):
                pipe.hmget(k, cf)
            for k in layout.keys("terminal_risk", t):
                pipe.hmget(k, tf)
            return pipe.execute()

        ts_counter = [BASE_MS + 1]

        def write_ours(i: int) -> object:
            c, _ = batches[i]
            ts_counter[0] += 1
            vals = {
                f: np.arange(b) % 50 if "nb_tx" in f else np.full(b, 0.5) for f in CUSTOMER_FEATURES
            }
            return writer.write(CUSTOMER_VIEW, c, vals, np.full(b, ts_counter[0]))

        def write_feast(i: int) -> object:
            c, _ = batches[i]
            ts_counter[0] += 1
            df = pd.DataFrame({"customer_id": c.astype(np.int64)})
            for f in CUSTOMER_FEATURES:
                df[f] = np.arange(b) % 50 if "nb_tx" in f else np.full(b, 0.5)
            df["event_timestamp"] = pd.Timestamp(ts_counter[0], unit="ms", tz="UTC")
            df["created_timestamp"] = df["event_timestamp"]
            return store.push("customer_spending_push", df)

        results = {
            "read: OnlineFeatureReader": _median_rows_per_s(ours, b, args.repeats),
            "read: FeatureStore.get_online_features": _median_rows_per_s(feast, b, args.repeats),
            "read: bare pipelined HMGET (no decode)": _median_rows_per_s(bare, b, args.repeats),
            "write: OnlineFeatureWriter": _median_rows_per_s(write_ours, b, args.repeats),
            "write: FeatureStore.push": _median_rows_per_s(write_feast, b, args.repeats),
        }
        for name, rps in results.items():
            print(f"{name:45s} {rps:12,.0f} rows/s  ({b / rps * 1000:7.2f} ms / batch of {b})")


if __name__ == "__main__":
    main()

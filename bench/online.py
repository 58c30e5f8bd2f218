"""Goals 1 and 2: the online fast path against Feast's SDK and a bare pipelined HMGET.

Reads: the same random entity batches through :class:`OnlineFeatureReader`, through
``FeatureStore.get_online_features`` and through a redis-py pipeline of one ``HMGET`` per
(entity, view) with no decoding (the floor). Writes: the same rows through
:class:`OnlineFeatureWriter` and through ``FeatureStore.push`` (online only). Trials of the
contenders are interleaved so that noise on the shared machine hits them alike.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from bench.results import interleaved, median
from stages.shared.feast_store import open_feature_store
from stages.shared.online.layout import OnlineLayout
from stages.shared.online.reader import OnlineFeatureReader
from stages.shared.online.writer import OnlineFeatureWriter
from stages.shared.schemas import CUSTOMER_FEATURES, CUSTOMER_VIEW, TERMINAL_FEATURES, TERMINAL_VIEW
from stages.shared.settings import Settings

logger = logging.getLogger(__name__)

BATCH_SIZES = (1, 100, 500, 2_000)
BASE_MS = 1_750_000_000_000


@dataclass(frozen=True)
class ReadTiming:
    """Median seconds per batch of each contender at one batch size."""

    batch: int
    ours_s: float
    feast_s: float
    bare_s: float


@dataclass(frozen=True)
class WriteTiming:
    batch: int
    ours_s: float
    feast_s: float


@dataclass(frozen=True)
class OnlineResults:
    reads: list[ReadTiming]
    write: WriteTiming


def fill(writer: OnlineFeatureWriter, n_entities: int, seed: int = 0) -> None:
    """Write both views for entity ids ``0..n_entities-1``."""
    rng = np.random.default_rng(seed)
    for view, features in ((CUSTOMER_VIEW, CUSTOMER_FEATURES), (TERMINAL_VIEW, TERMINAL_FEATURES)):
        for lo in range(0, n_entities, 5_000):
            ids = np.arange(lo, min(lo + 5_000, n_entities))
            vals = {
                f: rng.integers(0, 100, len(ids)) if "nb_tx" in f else rng.random(len(ids))
                for f in features
            }
            writer.write(view, ids, vals, np.full(len(ids), BASE_MS))


def run(settings: Settings, quick: bool) -> OnlineResults:
    """Measure reads at each batch size and writes at 500 rows; ``settings`` must carry an
    applied, isolated Feast project on the bench Redis."""
    store = open_feature_store(settings)
    client = settings.redis.client()
    layout = OnlineLayout.from_store(store)
    writer = OnlineFeatureWriter(client, layout)
    n_entities = 20_000 if quick else 100_000
    fill(writer, n_entities)
    reader = OnlineFeatureReader(client, layout, settings.prediction.feature_service)
    service = store.get_feature_service(settings.prediction.feature_service)
    cv, tv = layout.views[CUSTOMER_VIEW], layout.views[TERMINAL_VIEW]
    cf, tf = (*cv.field_keys, cv.ts_field), (*tv.field_keys, tv.ts_field)
    rng = np.random.default_rng(1)
    repeats = 5 if quick else 15

    reads = []
    for b in BATCH_SIZES:
        reps = max(3, repeats // 3) if b >= 2_000 and quick else repeats
        batches = [
            (rng.integers(0, n_entities, b), rng.integers(0, n_entities, b))
            for _ in range(reps + 1)
        ]

        def ours(i: int, batches: list[Any] = batches) -> object:
            c, t = batches[i]
            return reader.read({"customer_id": c, "terminal_id": t})

        def feast(i: int, batches: list[Any] = batches) -> object:
            c, t = batches[i]
            rows = [
                {"customer_id": int(x), "terminal_id": int(y)} for x, y in zip(c, t, strict=True)
            ]
            return store.get_online_features(features=service, entity_rows=rows).to_dict()

        def bare(i: int, batches: list[Any] = batches) -> object:
            c, t = batches[i]
            pipe: Any = client.pipeline(transaction=False)
            for k in layout.keys(CUSTOMER_VIEW, np.unique(c)):
                pipe.hmget(k, cf)
            for k in layout.keys(TERMINAL_VIEW, np.unique(t)):
                pipe.hmget(k, tf)
            return pipe.execute()

        times = interleaved({"ours": ours, "feast": feast, "bare": bare}, reps)
        reads.append(
            ReadTiming(b, median(times["ours"]), median(times["feast"]), median(times["bare"]))
        )
        logger.info("online read batch %d: %s", b, reads[-1])

    b = 500
    ts = [BASE_MS + 1]
    write_batches = [rng.integers(0, n_entities, b) for _ in range(repeats + 1)]
    vals = {f: np.arange(b) % 50 if "nb_tx" in f else np.full(b, 0.5) for f in CUSTOMER_FEATURES}

    def write_ours(i: int) -> object:
        ts[0] += 1
        return writer.write(CUSTOMER_VIEW, write_batches[i], vals, np.full(b, ts[0]))

    def write_feast(i: int) -> object:
        ts[0] += 1
        df = pd.DataFrame({"customer_id": write_batches[i].astype(np.int64)})
        for f in CUSTOMER_FEATURES:
            df[f] = vals[f]
        df["event_timestamp"] = pd.Timestamp(ts[0], unit="ms", tz="UTC")
        df["created_timestamp"] = df["event_timestamp"]
        return store.push("customer_spending_push", df)

    w = interleaved({"ours": write_ours, "feast": write_feast}, repeats)
    write = WriteTiming(b, median(w["ours"]), median(w["feast"]))
    logger.info("online write: %s", write)
    return OnlineResults(reads=reads, write=write)

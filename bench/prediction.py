"""Goal 3: prediction stage events/s against the naive per-event consumer, both reading the
same pre-filled ``transactions.enriched`` topic and scoring with the same registered model.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import orjson
import pandas as pd
from confluent_kafka import Producer

from bench.naive import NaiveScorer, run_naive
from bench.results import Versus, median
from stages.prediction.app import build_stage
from stages.shared.batch_loop import TransactionalBatchLoop
from stages.shared.feast_store import open_feature_store
from stages.shared.kafka import StopFlag, ensure_topics, producer_config
from stages.shared.metrics import build_metrics
from stages.shared.online.layout import OnlineLayout
from stages.shared.online.writer import OnlineFeatureWriter
from stages.shared.schemas import CUSTOMER_FEATURES, CUSTOMER_VIEW, TERMINAL_FEATURES, TERMINAL_VIEW
from stages.shared.settings import Settings
from training import registry

logger = logging.getLogger(__name__)


def _ms(tx: pd.DataFrame) -> np.ndarray:
    return tx["tx_datetime"].astype("datetime64[ms, UTC]").astype("int64").to_numpy()


def prefill_enriched(settings: Settings, tx: pd.DataFrame) -> None:
    """Write ``tx`` to the enriched topic as the enrichment stage would (features carried),
    and online rows older than every event for its customers and terminals."""
    topic = settings.topics.name("enriched")
    ensure_topics(settings.kafka, settings.topics)
    event_ms = _ms(tx)
    now = int(time.time() * 1000)
    producer = Producer(producer_config(settings.kafka, **{"linger.ms": 20}))
    cf = dict.fromkeys(CUSTOMER_FEATURES, 1.0)
    tf = dict.fromkeys(TERMINAL_FEATURES, 0.0)
    cols = zip(
        tx["transaction_id"].tolist(),
        tx["customer_id"].tolist(),
        tx["terminal_id"].tolist(),
        tx["amount"].tolist(),
        event_ms.tolist(),
        strict=True,
    )
    for tid, cid, term, amount, ms in cols:
        value = orjson.dumps(
            {
                "transaction_id": tid,
                "customer_id": cid,
                "terminal_id": term,
                "amount": amount,
                "event_ms": ms,
                "ts": {"ingest_ms": now, "enriched_ms": now},
                "features": {CUSTOMER_VIEW: cf, TERMINAL_VIEW: tf},
            }
        )
        while True:
            try:
                producer.produce(topic, key=str(tid).encode(), value=value, timestamp=ms)
                break
            except BufferError:
                producer.poll(0.05)
    if producer.flush(60):
        raise RuntimeError("prefill: messages undelivered")

    store = open_feature_store(settings)
    writer = OnlineFeatureWriter(settings.redis.client(), OnlineLayout.from_store(store))
    older = int(event_ms.min()) - 86_400_000
    rng = np.random.default_rng(2)
    for view, key, feats in (
        (CUSTOMER_VIEW, "customer_id", CUSTOMER_FEATURES),
        (TERMINAL_VIEW, "terminal_id", TERMINAL_FEATURES),
    ):
        ids = np.unique(tx[key].to_numpy())
        vals = {
            f: rng.integers(0, 20, len(ids)) if "nb_tx" in f else rng.random(len(ids))
            for f in feats
        }
        writer.write(view, ids, vals, np.full(len(ids), older))


def run_ours(settings: Settings, in_topic: str, expected: int) -> tuple[int, float]:
    """The prediction stage's loop in this process until the topic is drained.

    Returns:
        (events, seconds from the first batch's start to the last batch's commit).
    """
    stage = build_stage(settings, build_metrics())
    marks: list[tuple[float, int, float]] = []

    def on_batch(n: int, seconds: float) -> None:
        marks.append((time.perf_counter(), n, seconds))

    loop = TransactionalBatchLoop(
        settings,
        group_id=settings.topics.group("bench-prediction"),
        input_topics=[in_topic],
        handler=stage.handle,
        max_batch=settings.prediction.max_batch,
        max_wait_ms=settings.prediction.max_wait_ms,
        stage="prediction",
        on_batch_done=on_batch,
    )
    stop = StopFlag()
    loop.run(stop, max_idle_s=3.0)
    if not marks:
        return 0, 0.0
    events = sum(n for _, n, _ in marks)
    if events < expected:
        logger.warning("prediction bench: %d of %d events scored", events, expected)
    first_start = marks[0][0] - marks[0][2]
    return events, marks[-1][0] - first_start


def naive_scorer(settings: Settings) -> NaiveScorer:
    store = open_feature_store(settings)
    loaded = registry.load_current(settings.registry_dir, settings.prediction.model_name)
    return NaiveScorer(
        store=store,
        service=store.get_feature_service(settings.prediction.feature_service),
        model=loaded.booster,
        features=tuple(loaded.features),
    )


def run(settings: Settings, tx: pd.DataFrame, quick: bool) -> Versus:
    """Pre-fill once; run ours and the naive consumer alternately, fresh groups each trial."""
    n_ours = min(len(tx), 5_000 if quick else 30_000)
    n_naive = 200 if quick else 1_000
    trials = 1 if quick else 3
    prefill_enriched(settings, tx.iloc[:n_ours])
    scorer = naive_scorer(settings)
    ours, naive = [], []
    for t in range(trials):
        trial = settings.model_copy(
            update={
                "topics": settings.topics.model_copy(
                    update={"prefix": f"{settings.topics.prefix}t{t}."}
                )
            }
        )
        # Same input topic for every trial; the trial prefix only renames outputs and groups.
        in_topic = settings.topics.name("enriched")
        ensure_topics(trial.kafka, trial.topics)
        n, s = run_ours(trial, in_topic, n_ours)
        ours.append(n / s if s else float("nan"))
        logger.info("prediction ours: %d events in %.2fs = %.0f/s", n, s, ours[-1])
        n, s = run_naive(trial, scorer, in_topic, trial.topics.name("predictions"), n_naive)
        naive.append(n / s if s else float("nan"))
        logger.info("prediction naive: %d events in %.2fs = %.1f/s", n, s, naive[-1])
    return Versus(median(ours), median(naive), n_ours, n_naive, trials)

"""End to end against the real broker and Redis: the three stages as separate processes,
a replay with malformed input mixed in, and the DESIGN.md invariant checked with an audit
that reads every outcome topic with read_committed.
"""

from __future__ import annotations

import time
from pathlib import Path

import orjson
import pandas as pd
import pytest
from confluent_kafka import Producer

from stages.ops.audit import audit, read_topic
from stages.ops.harness.processes import start_stages, stop_stages
from stages.ops.harness.sandbox import isolated_settings, register_tiny_model
from stages.ops.replay import ReplayPlan, replay
from stages.shared.feast_store import apply_repo
from stages.shared.kafka import DLQ_REASON, ensure_topics, producer_config
from stages.shared.schemas import CUSTOMER_FEATURES, TERMINAL_FEATURES
from stages.shared.settings import Settings
from training.features import compute_features

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]

# (payload, expected DLQ reason) for malformed transactions.
MALFORMED: list[tuple[bytes, str]] = [
    (b"not json at all", "not_json"),
    (b'{"transaction_id": 1, "customer_id": 2, "terminal_id": 3}', "missing_field"),
    (b'{"transaction_id": "x", "customer_id": 2, "terminal_id": 3, "amount": 1.0}', "wrong_type"),
    (b'{"transaction_id": 9, "customer_id": 2, "terminal_id": 3, "amount": -5}', "out_of_range"),
    (b'{"transaction_id": 9, "customer_id": 2, "terminal_id": 3, "amount": NaN}', "not_json"),
    (b"[1, 2, 3]", "not_object"),
    (b'{"pad": "' + b"x" * 70_000 + b'"}', "too_large"),
]


def test_every_transaction_ends_in_exactly_one_outcome(
    unique_topics: Settings, small_tx: pd.DataFrame, tmp_path: Path
) -> None:
    settings = isolated_settings(unique_topics, tmp_path)
    apply_repo(settings)
    register_tiny_model(settings, small_tx)
    ensure_topics(settings.kafka, settings.topics)

    start = pd.Timestamp("2018-05-05", tz="UTC")
    # 30 days of history warm the customer windows up: features are exact from the first
    # scored transaction.
    plan = ReplayPlan(start, start + pd.Timedelta(days=2), history_days=30)
    expected = small_tx.loc[
        (small_tx["tx_datetime"] >= plan.start) & (small_tx["tx_datetime"] < plan.end),
        "transaction_id",
    ].tolist()
    assert len(expected) > 300

    procs = start_stages(settings)
    try:
        result = replay(settings, small_tx, plan)
        assert result.transactions == len(expected)
        producer = Producer(producer_config(settings.kafka))
        for payload, _ in MALFORMED:
            producer.produce(settings.topics.name("transactions"), value=payload, key=b"2")
        assert producer.flush(30) == 0

        deadline = time.monotonic() + 180
        while True:
            report = audit(settings, expected)
            dlq = report.per_topic[settings.topics.dlq(settings.topics.name("transactions"))]
            if (not report.lost and dlq.count >= len(MALFORMED)) or time.monotonic() > deadline:
                break
            assert all(sp.proc.poll() is None for sp in procs), "a stage died"
            time.sleep(2)
    finally:
        codes = stop_stages(procs)

    assert report.lost == []
    assert report.duplicated == []
    # Only the malformed records that still carry a readable id are outside the replay.
    assert report.unexpected == [1, 9]
    decided = sum(report.per_topic[t].count for t in settings.topics.decision_topics())
    assert decided == len(expected)
    # Graceful shutdown on SIGTERM.
    assert codes == {"enrichment": 0, "prediction": 0, "routing": 0}

    # Malformed input: in the DLQ, original bytes kept, each with its reason.
    dlq_records = read_topic(settings, settings.topics.dlq(settings.topics.name("transactions")))
    got = sorted((v, h[DLQ_REASON].decode()) for _, v, h in dlq_records)
    assert got == sorted(MALFORMED)

    # Served features are point-in-time correct: equal to the batch definitions over the
    # whole history (customer windows warmed up by the history topic, terminal windows by
    # the labels of the 37 days before).
    preds = [
        orjson.loads(v) for _, v, _ in read_topic(settings, settings.topics.name("predictions"))
    ]
    assert len(preds) == len(expected)
    full = compute_features(small_tx).set_index("transaction_id")
    ids = [p["transaction_id"] for p in preds]
    served = pd.DataFrame(
        [p["features"] for p in preds], index=pd.Index(ids, name="transaction_id")
    )
    # Terminal and customer features alike.
    features = [*TERMINAL_FEATURES, *CUSTOMER_FEATURES]
    pd.testing.assert_frame_equal(
        served[features], full.loc[ids, features], check_dtype=False, atol=1e-9, rtol=0
    )
    assert {p["model_version"] for p in preds} == {"v0001"}

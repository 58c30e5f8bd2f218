"""End to end against the real broker and Redis: the three stages as separate processes,
a replay with malformed input mixed in, and the DESIGN.md invariant checked with an audit
that reads every outcome topic with read_committed. The promoted model is a v2 model
(feature service ``fraud_model_v2``) with a v1 model as its shadow: served features of
both services, the skew check and the online audit are checked against the batch
definitions.
"""

from __future__ import annotations

import time
from pathlib import Path

import lightgbm as lgb
import numpy as np
import orjson
import pandas as pd
import pytest
from confluent_kafka import Producer

from stages.ops.audit import audit, check_online_features, read_topic
from stages.ops.commit_waits import pipeline_ports, read_totals
from stages.ops.harness.processes import start_stages, stop_stages
from stages.ops.harness.sandbox import isolated_settings, register_tiny_model
from stages.ops.replay import ReplayPlan, replay
from stages.shared.feast_store import apply_repo
from stages.shared.kafka import DLQ_REASON, ensure_topics, producer_config
from stages.shared.metrics import COMMIT_PHASES
from stages.shared.schemas import (
    BEHAVIOUR_FEATURES,
    BEHAVIOUR_VIEW,
    CUSTOMER_FEATURES,
    CUSTOMER_VIEW,
    MODEL_FEATURES_V2,
    TERMINAL_FEATURES,
    TERMINAL_VIEW,
)
from stages.shared.settings import Settings
from training import registry
from training.features import compute_features
from training.skew import check_skew, predictions_frame

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


def promote_v2_model(settings: Settings, tx: pd.DataFrame) -> str:
    """A small LightGBM on the v2 batch features, registered with its service and promoted."""
    feats = compute_features(tx, MODEL_FEATURES_V2)
    label = tx.set_index("transaction_id").loc[feats["transaction_id"], "is_fraud"]
    x = feats[list(MODEL_FEATURES_V2)].to_numpy(np.float64)
    data = lgb.Dataset(x, label=label.to_numpy(), feature_name=list(MODEL_FEATURES_V2))
    params = {"objective": "binary", "num_leaves": 8, "verbose": -1, "seed": 0}
    text = lgb.train(params, data, num_boost_round=20).model_to_string()
    meta = {"features": list(MODEL_FEATURES_V2), "feature_service": "fraud_model_v2"}
    name = settings.prediction.model_name
    version = registry.register(settings.registry_dir, name, text, meta).version
    registry.promote(settings.registry_dir, name, version)
    return version


def test_every_transaction_ends_in_exactly_one_outcome(
    unique_topics: Settings, small_tx: pd.DataFrame, tmp_path: Path
) -> None:
    settings = isolated_settings(unique_topics, tmp_path)
    apply_repo(settings)
    promote_v2_model(settings, small_tx)
    # A v1 model beside it, as the shadow: the stage reads both services' features.
    shadow = register_tiny_model(settings, small_tx, promote=False)
    registry.set_shadow(settings.registry_dir, settings.prediction.model_name, shadow)
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
        # Every stage timed the steps of its exactly-once commits (rtpipe_commit_phase_seconds):
        # the enrichment checkpoint, overlapped, all four.
        waited = read_totals(settings.metrics.host, pipeline_ports(settings))
    finally:
        codes = stop_stages(procs)

    assert report.lost == []
    assert report.duplicated == []
    # Only the malformed records that still carry a readable id are outside the replay.
    assert report.unexpected == [1, 9]
    decided = sum(report.per_topic[t].count for t in settings.topics.decision_topics())
    assert decided == len(expected)
    for stage, steps in (
        ("enrichment", COMMIT_PHASES),
        ("prediction", ("offsets", "flush", "end_txn")),
        ("routing", ("offsets", "flush", "end_txn")),
    ):
        for step in steps:
            seconds, count = waited.get((stage, step), (0.0, 0.0))
            assert count > 0 and seconds >= 0, (stage, step, waited)
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
    full = compute_features(small_tx, MODEL_FEATURES_V2).set_index("transaction_id")
    ids = [p["transaction_id"] for p in preds]
    served = pd.DataFrame(
        [p["features"] for p in preds], index=pd.Index(ids, name="transaction_id")
    )
    # Terminal and customer features alike, and the v2 ones the v2 model was served.
    features = [*TERMINAL_FEATURES, *CUSTOMER_FEATURES, *BEHAVIOUR_FEATURES]
    pd.testing.assert_frame_equal(
        served[features], full.loc[ids, features], check_dtype=False, atol=1e-9, rtol=0
    )
    assert {p["model_version"] for p in preds} == {"v0001"}

    # The v1 shadow scored every row; each record names the v2 service and its views only.
    assert list(served.columns) == list(MODEL_FEATURES_V2)
    assert {p["feature_service"] for p in preds} == {"fraud_model_v2"}
    assert {p["shadow"]["model_version"] for p in preds} == {shadow}
    assert all(
        set(p["feature_age_s"]) == {CUSTOMER_VIEW, TERMINAL_VIEW, BEHAVIOUR_VIEW} for p in preds
    )
    # The skew check (what `rtpipe check-skew` runs) finds nothing, on every v2 feature.
    report = check_skew(
        settings,
        small_tx,
        predictions_frame(preds),
        expected,
        history_start=plan.start - pd.Timedelta(days=plan.history_days),
        offline=False,
    )
    assert report.online is not None and list(report.online.index) == list(MODEL_FEATURES_V2)
    assert report.ok, str(report)
    # The online store holds every scored customer's last rows of both customer views (the
    # warm-up transactions are never pushed: customers with only those have no row).
    check = check_online_features(
        settings,
        small_tx,
        plan.start - pd.Timedelta(days=plan.history_days),
        plan.end,
        feature_service="fraud_model_v2",
    )
    scored = set(small_tx.set_index("transaction_id").loc[expected, "customer_id"].tolist())
    for view in (CUSTOMER_VIEW, BEHAVIOUR_VIEW, TERMINAL_VIEW):
        assert check.mismatched[view] == [], view
    assert check.entities[BEHAVIOUR_VIEW] == check.entities[CUSTOMER_VIEW] >= len(scored) > 0
    for view in (CUSTOMER_VIEW, BEHAVIOUR_VIEW):
        assert scored.isdisjoint(check.missing[view]), view
        assert len(check.missing[view]) == check.entities[view] - len(scored), view

"""The evaluation stage against the real broker and Redis: predictions and delayed labels on
the test's own topics, joined across a restart; metric values equal to computing them on the
joined pairs directly; a drifted score distribution emits exactly one retraining request
within the cooldown.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import orjson
import pandas as pd
import pytest
from confluent_kafka import Producer
from sklearn.metrics import average_precision_score, roc_auc_score

from stages.evaluation.app import run
from stages.ops.audit import read_topic
from stages.ops.run_charts import KAFKA_LAG, KafkaLagProbe
from stages.shared.kafka import StopFlag, ensure_topics, producer_config
from stages.shared.metrics import Metrics, build_metrics
from stages.shared.settings import EvaluationSettings, RoutingSettings, Settings
from training import registry
from training.reference import build_reference

pytestmark = pytest.mark.integration

N_PRED = 400
N_LABELLED_FIRST = 300
N_DRIFTED = 600


def produce(settings: Settings, topic: str, records: list[tuple[bytes, dict[str, object]]]) -> None:
    producer = Producer(producer_config(settings.kafka))
    for key, value in records:
        producer.produce(topic, key=key, value=orjson.dumps(value))
    assert producer.flush(30) == 0


def run_until(
    settings: Settings, done: Callable[[Metrics], bool], timeout_s: float = 90
) -> Metrics:
    """Run the stage in a thread until ``done(metrics)`` holds, then stop it gracefully."""
    metrics = build_metrics()
    stop = StopFlag()
    errors: list[BaseException] = []

    def target() -> None:
        try:
            run(settings, stop, metrics=metrics)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    try:
        while not done(metrics) and time.monotonic() < deadline and thread.is_alive():
            time.sleep(0.5)
        # A few more batches, so a spurious second request would have had its chance.
        time.sleep(2.0)
    finally:
        stop.set()
        thread.join(60)
    assert not errors, errors
    assert done(metrics), "the stage did not reach the expected state in time"
    return metrics


def value(metrics: Metrics, name: str, labels: dict[str, str] | None = None) -> float:
    v = metrics.registry.get_sample_value(name, labels or {})
    return float("nan") if v is None else v


def test_joins_labels_exports_metrics_and_requests_retraining_once(
    unique_topics: Settings, tmp_path: Path
) -> None:
    settings = unique_topics.model_copy(
        update={
            "home": tmp_path / "home",
            "routing": RoutingSettings(action_threshold=0.15, review_threshold=0.1),
            "evaluation": EvaluationSettings(
                # Many small batches, each re-evaluated: only the cooldown keeps it to one.
                max_batch=100,
                metrics_interval_s=0,
                window=1_000,
                drift_window=500,
                min_labelled=100,
                min_flagged=10,
                min_predictions=200,
                precision_floor=0.3,
                auc_floor=0.6,
                retrain_cooldown_s=3_600,
            ),
        }
    )
    t = settings.topics
    ensure_topics(settings.kafka, t)
    rng = np.random.default_rng(3)

    # The model's training reference: scores U(0, 0.2), amounts N(50, 10).
    train_scores = rng.uniform(0, 0.2, 5_000)
    train_amounts = rng.normal(50, 10, 5_000)
    ref = build_reference(pd.DataFrame({"amount": train_amounts}), train_scores)
    version = registry.register(
        settings.registry_dir, settings.prediction.model_name, "unused", {"reference": ref}
    ).version

    # Live traffic like the training data; frauds mostly among the high scores.
    scores = rng.uniform(0, 0.2, N_PRED)
    amounts = rng.normal(50, 10, N_PRED)
    y = ((scores + rng.normal(0, 0.04, N_PRED)) > 0.16).astype(int)

    def prediction(tid: int, score: float, amount: float) -> tuple[bytes, dict[str, object]]:
        return str(tid).encode(), {
            "transaction_id": tid,
            "score": float(score),
            "model": "fraud",
            "model_version": version,
            "event_ms": 1_533_000_000_000 + tid,
            "features": {"amount": float(amount), "terminal_risk_1d": None},
        }

    def label(tid: int) -> tuple[bytes, dict[str, object]]:
        return b"7", {"transaction_id": tid, "terminal_id": 7, "tx_ms": 1, "is_fraud": int(y[tid])}

    # Some labels are read before their prediction (either order joins); labels of unknown
    # transactions only wait, and a label read twice counts once.
    produce(settings, t.name("labels"), [label(i) for i in range(50)])
    produce(
        settings,
        t.name("predictions"),
        [prediction(i, scores[i], amounts[i]) for i in range(N_PRED)],
    )
    unknown: list[tuple[bytes, dict[str, object]]] = [
        (b"7", {"transaction_id": 10**9 + i, "is_fraud": 1}) for i in range(20)
    ]
    produce(
        settings,
        t.name("labels"),
        [label(i) for i in range(50, N_LABELLED_FIRST)] + unknown + [label(3)],
    )

    m1 = run_until(settings, lambda m: value(m, "rtpipe_labels_joined_total") >= N_LABELLED_FIRST)
    assert value(m1, "rtpipe_labels_joined_total") == N_LABELLED_FIRST
    done = np.arange(N_LABELLED_FIRST)
    assert value(m1, "rtpipe_online_window_labelled") == N_LABELLED_FIRST
    assert value(m1, "rtpipe_online_roc_auc") == pytest.approx(roc_auc_score(y[done], scores[done]))
    assert value(m1, "rtpipe_online_average_precision") == pytest.approx(
        average_precision_score(y[done], scores[done])
    )
    flagged = scores[done] >= 0.15
    precision = y[done][flagged].mean()
    assert value(m1, "rtpipe_online_precision") == pytest.approx(precision)
    assert value(m1, "rtpipe_online_precision_at", {"threshold": "action"}) == pytest.approx(
        precision
    )
    assert value(m1, "rtpipe_online_recall", {"threshold": "review"}) == pytest.approx(
        (y[done][scores[done] >= 0.1]).sum() / y[done].sum()
    )
    ece = value(m1, "rtpipe_online_ece")
    assert 0 <= ece < 0.5
    assert value(m1, "rtpipe_score_psi") < 0.1
    assert value(m1, "rtpipe_feature_psi", {"feature": "amount"}) < 0.1
    assert value(m1, "rtpipe_drift_window_predictions") == N_PRED
    assert value(m1, "rtpipe_retrain_requests_total", {"reason": "score_psi"}) == 0
    retrain_topic = f"{t.prefix}model.retrain_requests"
    assert read_topic(settings, retrain_topic) == []

    # Restart: the predictions still waiting are joined by labels read after the restart,
    # and the scores now come from a different distribution.
    produce(settings, t.name("labels"), [label(i) for i in range(N_LABELLED_FIRST, N_PRED)])
    drifted = [
        prediction(N_PRED + i, float(s), float(a))
        for i, (s, a) in enumerate(
            zip(rng.uniform(0.5, 1.0, N_DRIFTED), rng.normal(50, 10, N_DRIFTED), strict=True)
        )
    ]
    produce(settings, t.name("predictions"), drifted)
    # The run report's lag probe reads the group's lag from Kafka: all of phase 2 is behind.
    probe = KafkaLagProbe(settings, ["evaluation"])
    try:
        lag = probe.poll()
    finally:
        probe.close()
    assert [(f.stage, f.samples) for f in lag] == [
        (
            "evaluation",
            {(KAFKA_LAG, (("stage", "evaluation"),)): N_DRIFTED + N_PRED - N_LABELLED_FIRST},
        )
    ]

    def phase2(m: Metrics) -> bool:
        seen = value(
            m, "rtpipe_evaluation_records_total", {"kind": "prediction", "outcome": "pending"}
        )
        return (
            value(m, "rtpipe_labels_joined_total") >= N_PRED - N_LABELLED_FIRST
            and seen >= N_DRIFTED
        )

    m2 = run_until(settings, phase2)
    assert value(m2, "rtpipe_labels_joined_total") == N_PRED - N_LABELLED_FIRST
    assert value(m2, "rtpipe_online_window_labelled") == N_PRED
    assert value(m2, "rtpipe_online_roc_auc") == pytest.approx(roc_auc_score(y, scores))
    assert value(m2, "rtpipe_score_psi") > 1.0
    assert value(m2, "rtpipe_feature_psi", {"feature": "amount"}) < 0.1

    requests = [orjson.loads(v or b"") for _, v, _ in read_topic(settings, retrain_topic)]
    assert len(requests) == 1, requests
    req = requests[0]
    assert req["reason"] == "score_psi"
    assert req["model_version"] == version
    assert req["metrics"]["score_psi"] > 0.2
    assert req["triggers"][0]["threshold"] == 0.2
    assert req["window"]["model_versions"] == {version: req["window"]["labelled"]}
    assert value(m2, "rtpipe_retrain_requests_total", {"reason": "score_psi"}) == 1

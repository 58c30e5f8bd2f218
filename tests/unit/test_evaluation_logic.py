"""Evaluation stage logic: join protocol, online metrics, calibration, PSI and triggers, with
expectations computed by hand."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import orjson
import pandas as pd
import pytest

from stages.evaluation.app import EvaluationStage
from stages.evaluation.drift import DriftWindow, drift_psi, retrain_request, retrain_triggers
from stages.evaluation.join import (
    JoinItem,
    MemoryJoinStore,
    PredictionRow,
    decode_window,
    label_half,
    prediction_half,
    scored_prediction,
)
from stages.evaluation.quality import (
    calibration_bins,
    expected_calibration_error,
    online_metrics,
    precision_recall_at,
)
from stages.shared.metrics import build_metrics
from stages.shared.records import Label, parse_label
from stages.shared.schemas import InvalidMessage
from stages.shared.settings import EvaluationSettings, RoutingSettings, Settings
from training import registry
from training.reference import (
    Histogram,
    bin_fractions,
    build_reference,
    psi,
    psi_against,
    reference_from_metadata,
)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def pred(tid: int, score: float, version: str = "v0001", **features: float) -> PredictionRow:
    return PredictionRow(tid, score, version, 1_000 + tid, dict(features))


def p_item(tid: int, score: float) -> JoinItem:
    return JoinItem("prediction", tid, prediction_half(pred(tid, score)))


def l_item(tid: int, y: int) -> JoinItem:
    return JoinItem("label", tid, label_half(Label(tid, 0, 1, y)))


# --- parsing ---------------------------------------------------------------------------------
def test_parse_prediction_keeps_score_version_and_features() -> None:
    raw = orjson.dumps(
        {
            "transaction_id": 7,
            "score": 0.25,
            "model_version": "v0002",
            "event_ms": 123,
            "features": {"amount": 10, "terminal_risk_1d": None},
        }
    )
    p = scored_prediction(raw)
    assert (p.transaction_id, p.score, p.model_version, p.event_ms) == (7, 0.25, "v0002", 123)
    assert p.features["amount"] == 10.0
    assert math.isnan(p.features["terminal_risk_1d"])


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"nope", "not_json"),
        (b"[]", "not_object"),
        (b'{"score": 0.1}', "missing_field"),
        (b'{"transaction_id": 1, "score": null, "error": "features_unavailable"}', "no_score"),
        (b'{"transaction_id": 1, "score": true}', "no_score"),
    ],
)
def test_parse_prediction_rejects(raw: bytes, reason: str) -> None:
    with pytest.raises(InvalidMessage) as exc:
        scored_prediction(raw)
    assert exc.value.reason == reason


def test_parse_label() -> None:
    raw = b'{"transaction_id": 3, "is_fraud": 1, "terminal_id": 2, "tx_ms": 5}'
    assert parse_label(raw) == Label(3, 2, 5, 1)
    with pytest.raises(InvalidMessage):
        parse_label(b'{"transaction_id": 3, "is_fraud": 2}')


# --- join ------------------------------------------------------------------------------------
def test_join_in_either_order_and_redelivery_is_not_counted_twice() -> None:
    store = MemoryJoinStore(EvaluationSettings(window=10))
    assert store.offer([p_item(1, 0.9), l_item(2, 0)]) == ["pending", "pending"]
    # label after prediction, prediction after label
    assert store.offer([l_item(1, 1), p_item(2, 0.1)]) == ["joined", "joined"]
    # a replayed batch: both halves again
    assert store.offer([p_item(1, 0.9), l_item(1, 1)]) == ["duplicate", "duplicate"]
    w = decode_window(store.window())
    assert w.score.tolist() == [0.1, 0.9]  # newest first
    assert w.is_fraud.tolist() == [0, 1]
    assert w.model_version.tolist() == ["v0001", "v0001"]
    assert w.event_ms.tolist() == [1_002, 1_001]


def test_pending_records_expire_by_their_ttl() -> None:
    clock = Clock()
    cfg = EvaluationSettings(pending_ttl_s=100, orphan_label_ttl_s=10)
    store = MemoryJoinStore(cfg, clock=clock)
    store.offer([l_item(1, 1), p_item(2, 0.5)])
    clock.t = 11  # the early label expired; the prediction still waits
    assert store.offer([p_item(1, 0.9), l_item(2, 0)]) == ["pending", "joined"]
    clock.t = 200  # the prediction of 1 expired too
    assert store.offer([l_item(1, 1)]) == ["pending"]
    assert len(store.window()) == 1


def test_window_keeps_the_newest_entries() -> None:
    store = MemoryJoinStore(EvaluationSettings(window=10))
    for tid in range(12):
        store.offer([p_item(tid, tid / 100), l_item(tid, 0)])
    w = decode_window(store.window())
    assert len(w) == 10
    assert w.score.tolist() == [t / 100 for t in range(11, 1, -1)]


def test_decode_window_skips_malformed_entries() -> None:
    w = decode_window(["0.5|v1|10|1", "garbage", b"0.25|v1|11|0", "x|v1|1|0"])
    assert w.score.tolist() == [0.5, 0.25]
    assert w.is_fraud.tolist() == [1, 0]


# --- metrics ---------------------------------------------------------------------------------
Y = np.array([1, 0, 1, 0, 0])
S = np.array([0.9, 0.8, 0.3, 0.1, 0.6])


def test_precision_recall_at_thresholds() -> None:
    # score >= 0.5 flags 0.9, 0.8, 0.6: one fraud of three flagged, one of two frauds found.
    assert precision_recall_at(Y, S, 0.5) == (1 / 3, 1 / 2, 3)
    # score >= 0.2 flags four rows with both frauds.
    assert precision_recall_at(Y, S, 0.2) == (2 / 4, 1.0, 4)
    p, r, n = precision_recall_at(Y, S, 0.95)
    assert math.isnan(p) and r == 0.0 and n == 0
    p, r, n = precision_recall_at(np.zeros(3, dtype=int), np.array([0.1, 0.6, 0.7]), 0.5)
    assert p == 0.0 and math.isnan(r) and n == 2


def test_online_metrics_by_hand() -> None:
    m = online_metrics(Y, S, RoutingSettings(action_threshold=0.5, review_threshold=0.2))
    # AUC: 0.9 beats all three negatives, 0.3 beats one (0.1): 4 of 6 pairs.
    assert m.roc_auc == pytest.approx(4 / 6)
    # AP: ranks 0.9 (P=1, R=.5) and 0.3 (P=2/4, R=1): 0.5 * 1 + 0.5 * 0.5.
    assert m.average_precision == pytest.approx(0.75)
    assert m.precision == {"action": 1 / 3, "review": 0.5}
    assert m.recall == {"action": 0.5, "review": 1.0}
    assert m.flagged == {"action": 3, "review": 4}
    assert (m.n, m.n_frauds) == (5, 2)
    assert len(m.calibration) == 5  # fewer rows than deciles: one row per bin


def test_calibration_deciles_and_ece() -> None:
    y = np.array([0, 1, 0, 1])
    s = np.array([0.1, 0.4, 0.2, 0.8])
    cal = calibration_bins(y, s, bins=2)
    # sorted by score: (0.1, 0), (0.2, 0) | (0.4, 1), (0.8, 1)
    assert [b.n for b in cal] == [2, 2]
    assert [b.mean_score for b in cal] == pytest.approx([0.15, 0.6])
    assert [b.fraud_rate for b in cal] == [0.0, 1.0]
    # ECE = 1/2 * |0.15 - 0| + 1/2 * |0.6 - 1|
    assert expected_calibration_error(cal) == pytest.approx(0.275)
    assert math.isnan(expected_calibration_error([]))
    # 20 rows in 10 deciles: two rows each
    y20 = np.array([0] * 18 + [1, 1])
    s20 = np.linspace(0, 0.95, 20)
    cal20 = calibration_bins(y20, s20)
    assert [b.n for b in cal20] == [2] * 10
    assert cal20[-1].fraud_rate == 1.0 and cal20[0].fraud_rate == 0.0
    assert cal20[-1].mean_score == pytest.approx((0.9 + 0.95) / 2)


# --- PSI -------------------------------------------------------------------------------------
def test_psi_by_hand() -> None:
    # (0.9 - 0.5) ln(0.9/0.5) + (0.1 - 0.5) ln(0.1/0.5) = 0.4 ln 9
    assert psi(np.array([0.5, 0.5]), np.array([0.9, 0.1])) == pytest.approx(0.4 * math.log(9))
    assert psi(np.array([0.2, 0.8]), np.array([0.2, 0.8])) == 0.0
    # an empty bin is raised to epsilon instead of giving an infinite PSI
    e = 1e-4
    expected = (0.5 - e) * math.log(0.5 / e) + (0.5 - 1) * math.log(0.5)
    assert psi(np.array([0.0, 1.0]), np.array([0.5, 0.5])) == pytest.approx(expected)


def test_bin_fractions_use_open_outer_bins() -> None:
    # edges [1, 2]: bins (-inf, 1), [1, 2), [2, inf); NaN is left out
    fr, n = bin_fractions(np.array([0, 1, 1.5, 2, 3, np.nan]), np.array([1.0, 2.0]))
    assert n == 5
    assert fr.tolist() == [1 / 5, 2 / 5, 2 / 5]


def test_reference_round_trip_and_metadata_keys() -> None:
    x = np.arange(1, 11, dtype=float)
    ref = build_reference(pd.DataFrame({"amount": x}), x / 10)
    hist = ref["features"]["amount"]["histogram"]
    assert hist["edges"] == pytest.approx(np.quantile(x, np.linspace(0.1, 0.9, 9)).tolist())
    assert sum(hist["fractions"]) == pytest.approx(1.0)
    parsed = reference_from_metadata({"reference": ref})
    assert parsed is not None and parsed.score is not None
    assert set(parsed.features) == {"amount"}
    # the training data against itself: no drift
    assert psi_against(parsed.features["amount"], x) == pytest.approx(0.0)
    # train.py's key, same shape
    assert reference_from_metadata({"training_distribution": ref}) is not None
    assert reference_from_metadata({"features": ["amount"]}) is None
    with pytest.raises(ValueError):
        Histogram(np.array([1.0]), np.array([1.0]))


def test_drift_window_wraps_and_clears_scores_on_a_new_model() -> None:
    w = DriftWindow(3, ["amount"])
    w.add([pred(i, i / 10, amount=float(i)) for i in range(5)])
    assert len(w) == 3
    assert sorted(w.scores().tolist()) == [0.2, 0.3, 0.4]
    assert sorted(w.feature("amount").tolist()) == [2.0, 3.0, 4.0]
    w.add([pred(9, 0.9, version="v0002", amount=9.0)])
    assert w.scores().tolist() == [0.9]
    assert sorted(w.feature("amount").tolist()) == [3.0, 4.0, 9.0]


def test_drift_psi_of_a_shifted_score() -> None:
    ref = reference_from_metadata(
        {
            "reference": {
                "score": {"histogram": {"edges": [0.5], "fractions": [0.5, 0.5]}},
                "features": {"amount": {"histogram": {"edges": [10.0], "fractions": [0.5, 0.5]}}},
            }
        }
    )
    assert ref is not None
    w = DriftWindow(10, ["amount"])
    # 9 of 10 scores above 0.5, amounts split evenly
    w.add([pred(i, 0.9 if i < 9 else 0.1, amount=5.0 if i % 2 else 15.0) for i in range(10)])
    d = drift_psi(w, ref)
    assert d.n == 10
    assert d.score_psi == pytest.approx(0.4 * math.log(9))
    assert d.feature_psi == {"amount": pytest.approx(0.0)}


# --- triggers --------------------------------------------------------------------------------
def test_triggers_respect_thresholds_and_minimum_sizes() -> None:
    cfg = EvaluationSettings(min_labelled=5, min_flagged=2, min_predictions=10, auc_floor=0.8)
    m = online_metrics(Y, S, RoutingSettings(action_threshold=0.5, review_threshold=0.2))
    ref = reference_from_metadata(
        {"reference": {"score": {"histogram": {"edges": [0.5], "fractions": [0.5, 0.5]}}}}
    )
    assert ref is not None
    w = DriftWindow(10, [])
    w.add([pred(i, 0.9 if i < 9 else 0.1) for i in range(10)])
    d = drift_psi(w, ref)
    got = retrain_triggers(m, d, cfg)
    assert [t.reason for t in got] == ["score_psi", "precision", "roc_auc"]
    assert got[1].value == pytest.approx(1 / 3) and got[1].threshold == 0.5
    # too few rows: nothing fires
    big = cfg.model_copy(update={"min_labelled": 6, "min_predictions": 11})
    assert retrain_triggers(m, d, big) == []
    assert retrain_triggers(None, None, cfg) == []

    req = retrain_request(got, m, d, None, "fraud", "v0001", now_ms=5)
    assert req["reason"] == "score_psi"
    assert req["model_version"] == "v0001"
    assert req["metrics"]["precision"]["action"] == pytest.approx(1 / 3)
    assert req["window"]["labelled"] == 5 and req["window"]["predictions"] == 10
    orjson.dumps(req)  # JSON-ready


# --- the stage handler on the in-memory store -------------------------------------------------
class FakeMessage:
    def __init__(self, topic: str, value: bytes) -> None:
        self._topic, self._value = topic, value

    def topic(self) -> str:
        return self._topic

    def value(self) -> bytes:
        return self._value


def _stage_on_memory_store(
    tmp_path: Path, metrics_interval_s: float
) -> tuple[EvaluationStage, Clock, Callable[[int, float], list[FakeMessage]]]:
    """An evaluation stage on the in-memory store with a fake clock, whose model's reference
    has one score in ten above 0.5, and ``batch(start, score)``: ten predictions from id
    ``start``, nine at ``score`` and one at ``max(score, 0.9)`` (like the reference when
    ``score`` is low)."""
    settings = Settings(
        home=tmp_path,
        evaluation=EvaluationSettings(
            metrics_interval_s=metrics_interval_s,
            min_predictions=10,
            min_labelled=1000,
            retrain_cooldown_s=60,
        ),
    )
    meta = {"reference": {"score": {"histogram": {"edges": [0.5], "fractions": [0.9, 0.1]}}}}
    mv = registry.register(settings.registry_dir, "fraud", "not used here", meta)
    clock = Clock()
    stage = EvaluationStage(
        settings, MemoryJoinStore(settings.evaluation, clock=clock), build_metrics(), clock=clock
    )
    topic = settings.topics.name("predictions")

    def batch(start: int, score: float) -> list[FakeMessage]:
        scores = [score] * 9 + [max(score, 0.9)]
        return [
            FakeMessage(
                topic,
                orjson.dumps({"transaction_id": i, "score": s, "model_version": mv.version}),
            )
            for i, s in zip(range(start, start + 10), scores, strict=True)
        ]

    return stage, clock, batch


def test_stage_emits_one_request_per_cooldown(tmp_path: Path) -> None:
    stage, clock, batch = _stage_on_memory_store(tmp_path, metrics_interval_s=0)
    assert stage.handle(batch(0, 0.1)) == []  # matches the reference
    assert stage.last_drift is not None and stage.last_drift.score_psi < 0.2
    out = stage.handle(batch(10, 0.9)) + stage.handle(batch(20, 0.9))  # drifted
    assert len(out) == 1
    req = orjson.loads(out[0].value)
    assert req["reason"] == "score_psi" and req["model_version"] == "v0001"
    assert out[0].topic == "model.retrain_requests"
    clock.t = 61  # cooldown over: the drift is still there
    assert len(stage.handle(batch(30, 0.9))) == 1
    reg = stage.metrics.registry
    assert reg.get_sample_value("rtpipe_retrain_requests_total", {"reason": "score_psi"}) == 2
    assert reg.get_sample_value("rtpipe_score_psi") == pytest.approx(stage.last_drift.score_psi)


def test_idle_stage_computes_what_arrived_since_once_due(tmp_path: Path) -> None:
    # The last batch of a burst lands before the next computation is due: while no more
    # input comes, on_idle computes it once due (the retrain gate reads those metrics), once,
    # and never emits a request (that needs a batch's transaction).
    stage, clock, batch = _stage_on_memory_store(tmp_path, metrics_interval_s=10)
    stage.on_idle()  # nothing offered yet: nothing to compute
    assert stage.last_drift is None
    assert stage.handle(batch(0, 0.1)) == []  # computed at once (due)
    first = stage.last_drift
    assert first is not None
    clock.t = 5
    assert stage.handle(batch(10, 0.9)) == []  # offered, not computed: not due
    stage.on_idle()
    assert stage.last_drift is first
    clock.t = 10
    stage.on_idle()  # due: computed over both batches
    assert stage.last_drift is not first and stage.last_drift is not None
    assert stage.last_drift.score_psi > first.score_psi
    second = stage.last_drift
    clock.t = 30
    stage.on_idle()  # nothing new since: not recomputed
    assert stage.last_drift is second
    reg = stage.metrics.registry
    assert reg.get_sample_value("rtpipe_score_psi") == pytest.approx(second.score_psi)
    assert not reg.get_sample_value("rtpipe_retrain_requests_total", {"reason": "score_psi"})

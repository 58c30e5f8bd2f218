"""The retrain job's pure parts (request, latest window, gate), the champion-vs-shadow
comparison of the evaluation stage, and the registry's shadow marker and lifecycle events."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import orjson
import pandas as pd
import pytest

from stages.evaluation.join import (
    PredictionRow,
    decode_window,
    label_half,
    prediction_half,
    scored_prediction,
)
from stages.evaluation.quality import ShadowComparison, shadow_comparisons
from stages.retrain.logic import (
    WindowError,
    gate,
    latest_window,
    parse_request,
    request_payload,
)
from stages.shared.metrics import build_metrics
from stages.shared.records import parse_label
from stages.shared.schemas import InvalidMessage
from stages.shared.settings import RetrainSettings, Settings
from training import registry
from training.evaluate import average_precision

UTC = "UTC"


def _cmp(n: int, frauds: int, champ: float, cand: float) -> ShadowComparison:
    return ShadowComparison("v0001", "v0002", n, frauds, champ, cand, 0.9, 0.9, 0, 1)


def test_gate_waits_for_the_sample_then_decides_on_ap() -> None:
    cfg = RetrainSettings(min_labelled=100, min_frauds=10, gate_timeout_s=60)
    assert gate(None, cfg, 0).outcome == "wait"
    assert gate(_cmp(99, 50, 0.1, 0.9), cfg, 0).outcome == "wait"
    assert gate(_cmp(500, 9, 0.1, 0.9), cfg, 0).outcome == "wait"
    assert gate(_cmp(50, 5, 0.1, 0.9), cfg, 61).outcome == "timeout"
    assert gate(_cmp(100, 10, 0.50, 0.51), cfg, 0).outcome == "promote"
    assert gate(_cmp(100, 10, 0.50, 0.50), cfg, 0).outcome == "promote"  # ties: the fresher
    assert gate(_cmp(100, 10, 0.50, 0.49), cfg, 0).outcome == "reject"
    assert gate(_cmp(100, 10, math.nan, 0.9), cfg, 0).outcome == "reject"
    tolerant = cfg.model_copy(update={"ap_tolerance": 0.02})
    assert gate(_cmp(100, 10, 0.50, 0.49), tolerant, 0).outcome == "promote"


def test_latest_window_ends_where_labels_are_known() -> None:
    cfg = RetrainSettings(n_folds=3)
    first = pd.Timestamp("2018-04-01 00:03", tz=UTC)
    last = pd.Timestamp("2018-06-30 23:50", tz=UTC)
    w = latest_window(first, last, pd.Timestamp("2018-06-10 13:00", tz=UTC), cfg)
    assert w.test_end == pd.Timestamp("2018-06-10", tz=UTC)
    assert w.test_start == pd.Timestamp("2018-06-03", tz=UTC)
    assert w.train_end == pd.Timestamp("2018-05-27", tz=UTC)
    assert w.train_start == pd.Timestamp("2018-05-20", tz=UTC)
    assert w.n_folds == 3
    # No bound from the request (or one past the data): every label of the data is known.
    assert latest_window(first, last, None, cfg).test_end == pd.Timestamp("2018-07-01", tz=UTC)
    far = pd.Timestamp("2030-01-01", tz=UTC)
    assert latest_window(first, last, far, cfg).test_end == pd.Timestamp("2018-07-01", tz=UTC)
    # Short data: fewer folds; too short: an error that says why.
    short = latest_window(first, pd.Timestamp("2018-05-12 22:00", tz=UTC), None, cfg)
    assert short.n_folds == 1 and short.train_start == pd.Timestamp("2018-04-22", tz=UTC)
    with pytest.raises(WindowError, match="validation fold"):
        latest_window(first, pd.Timestamp("2018-05-01", tz=UTC), None, cfg)


def test_request_round_trip_and_bad_requests() -> None:
    req = parse_request(request_payload("fraud", "manual", 123, 456), "t[0]@7")
    assert (req.model, req.reason, req.labels_known_ms, req.requested_ms) == (
        "fraud",
        "manual",
        123,
        456,
    )
    evaluation_style = orjson.dumps(
        {"reason": "score_psi", "model": "fraud", "window": {"last_event_ms": None}}
    )
    assert parse_request(evaluation_style, "x").labels_known_ms is None
    with pytest.raises(InvalidMessage):
        parse_request(b'{"reason": "x"}', "x")
    with pytest.raises(InvalidMessage):
        parse_request(b"not json", "x")


def _prediction(tid: int, score: float, shadow: float | None) -> bytes:
    rec: dict[str, object] = {
        "transaction_id": tid,
        "score": score,
        "model_version": "v0001",
        "event_ms": 1000 + tid,
    }
    if shadow is not None:
        rec["shadow"] = {"model_version": "v0002", "score": shadow}
    return orjson.dumps(rec)


def test_shadow_comparison_uses_only_the_events_both_scored() -> None:
    rng = np.random.default_rng(0)
    y = rng.random(400) < 0.2
    champ = rng.random(400)  # uninformative
    cand = np.where(y, 0.6, 0.4) + rng.normal(0, 0.1, 400)  # informative
    entries = []
    for i in range(400):
        p = scored_prediction(_prediction(i, float(champ[i]), float(cand[i]) if i < 300 else None))
        lab = parse_label(
            orjson.dumps({"transaction_id": i, "terminal_id": 1, "tx_ms": 1, "is_fraud": int(y[i])})
        )
        entries.append(f"{prediction_half(p)}|{label_half(lab)}")
    entries.append("0.5|v0001|1|0")  # an entry written before shadows existed
    window = decode_window(entries)
    assert len(window) == 401
    [c] = shadow_comparisons(window)
    assert (c.champion, c.shadow, c.n, c.n_frauds) == ("v0001", "v0002", 300, int(y[:300].sum()))
    assert c.shadow_average_precision == pytest.approx(average_precision(y[:300], cand[:300]))
    assert c.champion_average_precision == pytest.approx(average_precision(y[:300], champ[:300]))
    assert c.shadow_average_precision > c.champion_average_precision
    assert ShadowComparison.from_dict(orjson.loads(orjson.dumps(c.to_dict()))) == c
    # No shadow anywhere: nothing to compare.
    plain = PredictionRow(1, 0.3, "v0001", 5, {})
    assert shadow_comparisons(decode_window([f"{prediction_half(plain)}|1"])) == []


def test_registry_shadow_marker_and_events(tmp_path: Path) -> None:
    reg = tmp_path / "registry"
    v1 = registry.register(reg, "fraud", "tree", {"features": []}).version
    assert registry.shadow_version(reg, "fraud") is None
    registry.set_shadow(reg, "fraud", v1)
    assert registry.shadow_version(reg, "fraud") == v1
    registry.set_shadow(reg, "fraud", None)
    assert registry.shadow_version(reg, "fraud") is None
    with pytest.raises(registry.RegistryError):
        registry.set_shadow(reg, "fraud", "v0009")
    registry.record_event(reg, "fraud", "requested", None, request="t[0]@1")
    registry.record_event(reg, "fraud", "candidate", v1, request="t[0]@1")
    with (reg / "fraud" / registry.EVENTS_FILE).open("a") as fh:
        fh.write('{"torn')  # a crash mid-line
    steps = [(e["step"], e["version"], e["request"]) for e in registry.events(reg, "fraud")]
    assert steps == [("requested", None, "t[0]@1"), ("candidate", v1, "t[0]@1")]


def test_model_holder_follows_the_registry_shadow_marker(tmp_path: Path) -> None:
    from stages.ops.harness.sandbox import register_tiny_model
    from stages.prediction.models import ModelHolder
    from training.simulate import SimulatorConfig, simulate

    tx = simulate(SimulatorConfig(n_customers=20, n_terminals=40, nb_days=10, seed=1), False)
    base = Settings(home=tmp_path)
    settings = base.model_copy(
        update={"prediction": base.prediction.model_copy(update={"reload_interval_s": 0.001})}
    )
    v1 = register_tiny_model(settings, tx)
    v2 = register_tiny_model(settings, tx, promote=False, seed=1)
    holder = ModelHolder(settings, build_metrics())
    holder.load_initial()
    assert holder.current.version == v1 and holder.shadow is None
    registry.set_shadow(settings.registry_dir, "fraud", v2)
    holder._next_check = 0.0
    holder.maybe_reload()
    assert holder.shadow is not None and holder.shadow.version == v2
    # Promoted and unmarked: served, no longer a shadow.
    registry.promote(settings.registry_dir, "fraud", v2)
    registry.set_shadow(settings.registry_dir, "fraud", None)
    holder._next_check = 0.0
    holder.maybe_reload()
    assert holder.current.version == v2 and holder.shadow is None


def test_candidate_is_trained_on_its_champions_feature_service() -> None:
    from stages.retrain.logic import candidate_service
    from training.card import ModelCard

    def champion(**keys: object) -> ModelCard:
        registered = {"name": "fraud", "version": "v0001", "created_at": "2026-01-01T00:00:00"}
        return ModelCard.from_dict({**registered, **keys})

    assert candidate_service(champion(feature_service="fraud_model_v2"), "fraud_model_v1") == (
        "fraud_model_v2"
    )
    assert candidate_service(champion(features=[]), "fraud_model_v1") == "fraud_model_v1"
    assert candidate_service(champion(feature_service=""), "fraud_model_v1") == "fraud_model_v1"
    assert candidate_service(None, "fraud_model_v1") == "fraud_model_v1"


def test_retrain_history_days_reach_a_child_process_through_its_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from stages.shared.settings import settings_to_env

    parent = Settings(retrain=RetrainSettings(history_days=(7, 14, 28)))
    env = settings_to_env(parent)
    assert env["RTPIPE_RETRAIN__HISTORY_DAYS"] == "[7, 14, 28]"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    child = Settings()
    assert child.retrain.history_days == (7, 14, 28)
    assert child.retrain == parent.retrain
    monkeypatch.delenv("RTPIPE_RETRAIN__HISTORY_DAYS")
    assert Settings().retrain.history_days == (7,)  # the default: the training window only


@pytest.mark.parametrize("days", [(), (7, 0)])
def test_retrain_history_days_refuse_an_empty_list_or_a_day_below_one(
    days: tuple[int, ...],
) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        RetrainSettings(history_days=days)

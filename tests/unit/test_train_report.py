"""Baselines, tuning candidates, the side-by-side report and TrainResult's rendering."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from rich.console import Console

from stages.shared.schemas import MODEL_FEATURES
from training.baselines import BASELINES, fit_baselines, make_baseline
from training.dataset import Dataset
from training.evaluate import Metrics
from training.report import (
    PLOT_FILES,
    comparison_frame,
    markdown_table,
    render_report,
    text_table,
    timings_table,
    write_plots,
)
from training.train import DEFAULT_PARAMS, MONOTONE_INCREASING, StepTimer, TrainResult
from training.tune import (
    SEARCH_SPACE,
    ValidationSplitError,
    candidates,
    search,
    split_validation,
)

T0 = pd.Timestamp("2018-07-25", tz="UTC")


def metrics(auc: float, ap: float, cp: float) -> Metrics:
    return Metrics(
        roc_auc=auc,
        average_precision=ap,
        card_precision_at_k=cp,
        k=100,
        n_transactions=1000,
        n_frauds=10,
        n_removed_known_compromised=5,
        card_precision_per_day={"2018-08-08": cp},
    )


def toy(n: int = 4000, days: int = 7, seed: int = 0) -> Dataset:
    """Rows spread over ``days`` days whose label depends on amount and terminal risk."""
    rng = np.random.default_rng(seed)
    X = pd.DataFrame(rng.random((n, len(MODEL_FEATURES))), columns=list(MODEL_FEATURES))
    X["amount"] *= 300
    logit = -6 + 0.03 * X["amount"] + 4 * X["terminal_risk_7d"]
    y = pd.Series((rng.random(n) < 1 / (1 + np.exp(-logit))).astype("int8"))
    ts = T0 + pd.to_timedelta(np.sort(rng.random(n)) * days, unit="D")
    ids = pd.DataFrame(
        {
            "transaction_id": np.arange(n),
            "customer_id": rng.integers(0, 100, n),
            "terminal_id": rng.integers(0, 100, n),
            "tx_datetime": ts,
        }
    )
    return Dataset(X=X, y=y, ids=ids, start=T0, end=T0 + pd.Timedelta(days=days))


# --- baselines -------------------------------------------------------------------------------


def test_every_baseline_fits_and_ranks_better_than_chance() -> None:
    train, test = toy(seed=0), toy(seed=1)
    fitted = fit_baselines(train.X, train.y)
    assert [b.name for b in fitted] == list(BASELINES)
    from sklearn.metrics import roc_auc_score

    for b in fitted:
        s = b.predict(test.X)
        assert s.shape == (len(test),) and s.dtype == np.float64
        assert ((s >= 0) & (s <= 1)).all()
        assert roc_auc_score(test.y, s) > 0.75, b.name
        assert b.fit_seconds >= 0


def test_logistic_regression_standardises_its_inputs() -> None:
    model = make_baseline("logistic_regression")
    assert [name for name, _ in model.steps] == ["standardscaler", "logisticregression"]  # type: ignore[attr-defined]


def test_baselines_refuse_single_class_labels_and_unknown_names() -> None:
    d = toy(200)
    with pytest.raises(ValueError, match="both classes"):
        fit_baselines(d.X, np.zeros(len(d)))
    with pytest.raises(ValueError, match="unknown baseline"):
        make_baseline("svm")  # type: ignore[arg-type]


# --- tuning ----------------------------------------------------------------------------------


def test_candidates_start_with_the_defaults_and_are_distinct_and_reproducible() -> None:
    base = {**DEFAULT_PARAMS}
    c = candidates(8, base, seed=0)
    assert len(c) == 8
    assert c[0] == {k: base[k] for k in SEARCH_SPACE}
    assert len({tuple(sorted(x.items())) for x in c}) == 8
    assert all(x[k] in SEARCH_SPACE[k] for x in c[1:] for k in SEARCH_SPACE)
    assert c == candidates(8, base, seed=0)
    assert candidates(1, base) == [c[0]]
    with pytest.raises(ValueError):
        candidates(0, base)


def test_validation_split_uses_the_last_training_days_only() -> None:
    d = toy()
    fit_part, val_part = split_validation(d, 2)
    cut = d.end - pd.Timedelta(days=2)
    assert fit_part.ids["tx_datetime"].max() < cut <= val_part.ids["tx_datetime"].min()
    assert val_part.ids["tx_datetime"].max() < d.end
    assert len(fit_part) + len(val_part) == len(d)
    with pytest.raises(ValidationSplitError):
        split_validation(d, 7)  # nothing left to fit on
    no_fraud = Dataset(d.X, pd.Series(np.zeros(len(d), dtype="int8")), d.ids, d.start, d.end)
    with pytest.raises(ValidationSplitError):
        split_validation(no_fraud, 2)


def test_search_picks_the_best_validation_ap_and_keeps_every_trial() -> None:
    d = toy(6000)
    params = {**DEFAULT_PARAMS, "num_threads": 1}
    result = search(d, params, validation_days=2, n_trials=3, max_rounds=60, patience=10)
    assert len(result.trials) == 3
    assert result.best.validation_ap == max(t.validation_ap for t in result.trials)
    assert result.trials[0].params == {k: params[k] for k in SEARCH_SPACE}
    assert 1 <= result.best.best_iteration <= 60
    assert result.validation_frauds > 0 and result.validation_start == "2018-07-30"


def test_monotone_constraints_cover_the_terminal_risk_features_in_model_order() -> None:
    mc = DEFAULT_PARAMS["monotone_constraints"]
    assert len(mc) == len(MODEL_FEATURES)
    assert {f for f, c in zip(MODEL_FEATURES, mc, strict=True) if c == 1} == set(
        MONOTONE_INCREASING
    )
    assert all(c in (0, 1) for c in mc)


# --- report ----------------------------------------------------------------------------------

MODELS = {
    "lightgbm": metrics(0.88, 0.70, 0.33),
    "logistic_regression": metrics(0.86, 0.60, 0.28),
    "random_forest": metrics(0.89, 0.66, 0.30),
}


def test_comparison_frame_keeps_model_order_and_values() -> None:
    f = comparison_frame(MODELS)
    assert f["model"].tolist() == list(MODELS)
    assert f.loc[2, "roc_auc"] == 0.89 and f.loc[0, "average_precision"] == 0.70


def test_markdown_table_bolds_the_best_value_per_column() -> None:
    md = markdown_table(MODELS).splitlines()
    assert md[0] == "| model | ROC AUC | average precision | card precision@100 |"
    rows = {line.split("|")[1].strip(): line for line in md[2:]}
    assert "**0.7000**" in rows["lightgbm"] and "**0.3300**" in rows["lightgbm"]
    assert "**0.8900**" in rows["random_forest"] and "0.8800 " in rows["lightgbm"]
    assert "**" not in rows["logistic_regression"]


def test_text_table_aligns_and_shows_missing_values() -> None:
    lines = text_table({**MODELS, "empty": metrics(float("nan"), 0.1, 0.0)}).splitlines()
    assert lines[0].split() == ["model", "ROC", "AUC", "AP", "CP@100"]
    assert len({len(line) for line in lines}) == 1
    assert "n/a" in lines[-1]


def test_timings_table_totals_the_steps() -> None:
    t = timings_table({"join": 10.04, "fit": 2.0})
    assert "| join | 10.0 |" in t and "| **total** | **12.0** |" in t


def test_step_timer_accumulates_in_order() -> None:
    timer = StepTimer()
    with timer("a"):
        pass
    with timer("b"):
        pass
    with timer("a"):
        pass
    assert list(timer.seconds) == ["a", "b"] and all(v >= 0 for v in timer.seconds.values())


def test_write_plots_and_report(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    y = (rng.random(500) < 0.1).astype(int)
    scores = {name: np.clip(y * 0.5 + rng.random(500) * 0.6, 0, 1) for name in MODELS}
    importance = pd.Series(np.linspace(1, 0, len(MODEL_FEATURES)) / 7.5, index=list(MODEL_FEATURES))
    plots = write_plots(tmp_path, y, scores, importance)
    assert set(plots) == set(PLOT_FILES)
    for path in plots.values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    meta = {
        "name": "fraud",
        "version": "v0007",
        "feature_service": "fraud_model_v1",
        "features": list(MODEL_FEATURES),
        "training_window": {"start": "2018-07-25", "end_inclusive": "2018-07-31"},
        "test_window": {"start": "2018-08-08", "end_inclusive": "2018-08-14"},
        "n_train": 100,
        "n_train_frauds": 3,
        "best_iteration": 42,
        "validation_days": 2,
        "monotone_increasing": list(MONOTONE_INCREASING),
        "data_fingerprint": "ab" * 32,
        "tuning": {
            "trials": [
                {"params": {"num_leaves": 31}, "validation_ap": 0.5, "best_iteration": 40},
                {"params": {"num_leaves": 7}, "validation_ap": 0.6, "best_iteration": 42},
            ],
            "best": {"params": {"num_leaves": 7}},
            "validation_start": "2018-07-30",
            "validation_rows": 20,
            "validation_frauds": 2,
        },
    }
    text = render_report(meta, MODELS, importance, {"join": 1.0}, plots)
    assert text.startswith("# fraud v0007")
    assert markdown_table(MODELS) in text
    for path in plots.values():
        assert f"]({path.name})" in text
    assert "| 7 | 0.6000 (chosen) | 42 |" in text and "| 31 | 0.5000 | 40 |" in text
    assert "terminal_risk_7d" in text and "| **total** | **1.0** |" in text


def test_write_plots_skips_curves_without_both_classes(tmp_path: Path) -> None:
    importance = pd.Series(1.0 / len(MODEL_FEATURES), index=list(MODEL_FEATURES))
    plots = write_plots(
        tmp_path, np.zeros(50, int), {"lightgbm": np.linspace(0, 1, 50)}, importance
    )
    assert set(plots) == {"feature_importance", "score_distribution"}


def test_train_result_prints_the_side_by_side_table_and_times(tmp_path: Path) -> None:
    result = TrainResult(
        version="v0003",
        model_dir=tmp_path,
        metrics=MODELS["lightgbm"],
        best_iteration=10,
        train_window=("2018-07-25", "2018-07-31"),
        test_window=("2018-08-08", "2018-08-14"),
        report_path=tmp_path / "report.md",
        metadata={"name": "fraud"},
        model_metrics=MODELS,
        timings={"point-in-time join": 30.0, "fit lightgbm": 1.5},
    )
    text = str(result)
    assert "fraud v0003" in text and text_table(MODELS) in text
    assert "point-in-time join 30.0s" in text and "total 31.5s" in text
    console = Console(width=120, record=True)
    console.print(result)
    out = console.export_text()
    assert "random_forest" in out and "0.7000" in out and "31.5" in out

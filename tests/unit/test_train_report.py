"""Baselines, tuning candidates, the side-by-side report and TrainResult's rendering."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pandas as pd
import pytest
from rich.console import Console

from stages.shared.schemas import MODEL_FEATURES
from training.baselines import BASELINES, fit_baselines, make_baseline
from training.card import ModelCard
from training.dataset import Dataset, concat_datasets
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
from training.train import (
    DEFAULT_PARAMS,
    MONOTONE_INCREASING,
    StepTimer,
    TrainResult,
    average_boosters,
    refit,
)
from training.tune import (
    SEARCH_SPACE,
    FoldData,
    HistoryChoice,
    ValidationSplitError,
    candidates,
    cross_validate,
    feasible_history,
    fold_data,
    history_start,
    lightgbm_params,
    search,
    search_history,
    split_validation,
    validation_folds,
)
from training.uncertainty import difference_lines, paired_bootstrap

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


def toy(n: int = 4000, days: int = 7, seed: int = 0, customers: int = 100) -> Dataset:
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
            "customer_id": rng.integers(0, customers, n),
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

TINY_SPACE = {"num_leaves": (4, 7), "learning_rate": (0.1, 0.2), "monotone": (False, True)}
TINY_FOLDS = {"n_folds": 2, "fit_days": 2, "gap_days": 1, "val_days": 2}
FAST = {**DEFAULT_PARAMS, "num_threads": 1, "max_bin": 63}


def toy_folds(d: Dataset) -> list[FoldData]:
    folds = validation_folds(d.end, **TINY_FOLDS)
    history = d.ids.assign(is_fraud=d.y.to_numpy())
    return fold_data(d, folds, history, delay_days=1)


def test_candidates_defaults_then_monotone_flip_then_distinct_reproducible_draws() -> None:
    base = {**DEFAULT_PARAMS}
    c = candidates(8, base, seed=0)
    assert len(c) == 8
    assert c[0] == {k: base[k] for k in SEARCH_SPACE}
    assert c[1] == {**c[0], "monotone": not base["monotone"]}
    assert len({tuple(sorted(x.items())) for x in c}) == 8
    assert all(x[k] in SEARCH_SPACE[k] for x in c[1:] for k in SEARCH_SPACE)
    assert c == candidates(8, base, seed=0)
    assert c[2:] != candidates(8, base, seed=1)[2:]
    assert candidates(1, base) == [c[0]]
    with pytest.raises(ValueError):
        candidates(0, base)


def test_lightgbm_params_turns_the_monotone_switch_into_constraints() -> None:
    on = lightgbm_params({**DEFAULT_PARAMS, "monotone": True})
    assert "monotone" not in on
    mc = on["monotone_constraints"]
    assert len(mc) == len(MODEL_FEATURES)
    assert {f for f, c in zip(MODEL_FEATURES, mc, strict=True) if c == 1} == set(
        MONOTONE_INCREASING
    )
    assert set(mc) == {0, 1}
    off = lightgbm_params({**on, "monotone": False})
    assert "monotone_constraints" not in off and "monotone_constraints_method" not in off
    assert off["num_leaves"] == DEFAULT_PARAMS["num_leaves"]


def test_reference_folds_replay_the_protocol_before_the_test_window() -> None:
    train_end = pd.Timestamp("2018-08-01", tz="UTC")  # training 07-25..07-31
    folds = validation_folds(train_end)
    assert [f.to_dict() for f in folds] == [
        {"fit": "2018-07-11..2018-07-17", "validation": "2018-07-25..2018-07-31"},
        {"fit": "2018-07-04..2018-07-10", "validation": "2018-07-18..2018-07-24"},
        {"fit": "2018-06-27..2018-07-03", "validation": "2018-07-11..2018-07-17"},
    ]
    for f in folds:
        assert f.val_end <= train_end  # never the test window (which starts 08-08)
        assert f.val_start - f.fit_end == pd.Timedelta(days=7)  # the label-delay gap
    assert history_start(folds) == pd.Timestamp("2018-06-27", tz="UTC")
    with pytest.raises(ValueError):
        validation_folds(train_end, n_folds=0)


def test_fold_data_removes_known_compromised_cards_from_validation_days() -> None:
    d = toy(4000, days=7, customers=3000)
    folds = validation_folds(d.end, **TINY_FOLDS)
    history = d.ids.assign(is_fraud=d.y.to_numpy())
    data = fold_data(d, folds, history, delay_days=1)
    assert [f.fold for f in data] == folds
    for f in data:
        fit_cards = set(f.fit.ids.loc[f.fit.y.to_numpy() == 1, "customer_id"])
        assert fit_cards and not fit_cards & set(f.val.ids["customer_id"])
        assert f.fit.ids["tx_datetime"].between(f.fold.fit_start, f.fold.fit_end).all()
        assert (f.val.ids["tx_datetime"] >= f.fold.val_start).all()
        assert (f.val.ids["tx_datetime"] < f.fold.val_end).all()
        everything = d.slice_time(f.fold.val_start, f.fold.val_end)
        assert len(f.val) + f.n_removed == len(everything) and f.n_removed > 0
    no_fraud = Dataset(d.X, pd.Series(np.zeros(len(d), dtype="int8")), d.ids, d.start, d.end)
    with pytest.raises(ValidationSplitError):
        fold_data(no_fraud, folds, history, delay_days=1)


def test_known_days_scores_every_fit_length_on_the_same_validation_rows() -> None:
    d = toy(9000, days=9, customers=2500)
    history = d.ids.assign(is_fraud=d.y.to_numpy())
    layout = {"n_folds": 2, "gap_days": 1, "val_days": 2}
    rows = {}
    for fit_days in (2, 3, 4):
        folds = validation_folds(d.end, fit_days=fit_days, **layout)
        data = fold_data(d, folds, history, delay_days=1, known_days=2)
        rows[fit_days] = [tuple(f.val.ids["transaction_id"]) for f in data]
        for f in data:  # cards with a fraud in the last 2 fit days are removed, earlier not
            last = f.fit.slice_time(f.fold.fit_end - pd.Timedelta(days=2), f.fold.fit_end)
            known = set(last.ids.loc[last.y.to_numpy() == 1, "customer_id"])
            assert known and not known & set(f.val.ids["customer_id"])
    assert rows[2] == rows[3] == rows[4]
    # Without known_days the longer fit windows mark more cards: fewer validation rows.
    whole = fold_data(d, validation_folds(d.end, fit_days=4, **layout), history, delay_days=1)
    assert sum(len(f.val) for f in whole) < sum(len(r) for r in rows[4])


def test_feasible_history_keeps_the_training_length_and_what_the_data_holds() -> None:
    end = pd.Timestamp("2018-08-01", tz="UTC")
    first = pd.Timestamp("2018-05-20", tz="UTC")
    # 3 folds of 7 + 7 days before the end: a length fits if end - 21 - days >= first.
    assert feasible_history((42, 14, 28, 50), 7, end, first) == (7, 14, 28, 42)
    assert feasible_history((), 7, end, first) == (7,)
    assert feasible_history((14,), 7, end, end) == (7,)  # kept even when it cannot fit


def test_search_history_chooses_on_the_folds_and_fits_that_length() -> None:
    d = toy(9000, days=9, customers=2500)
    history = d.ids.assign(is_fraud=d.y.to_numpy())
    kw = {"n_folds": 2, "delay_days": 1, "val_days": 2, "max_rounds": 30, "patience": 5}
    choice = search_history(d, d.end, (4, 2, 3), 2, history, FAST, **kw)
    assert isinstance(choice, HistoryChoice)
    assert [t.days for t in choice.trials] == [2, 3, 4]
    best = max(choice.trials, key=lambda t: t.validation_ap)
    assert choice.days == best.days
    assert all(t.validation_ap == pytest.approx(float(np.mean(t.fold_aps))) for t in choice.trials)
    assert [f.fold.fit_end - f.fold.fit_start for f in choice.folds] == [
        pd.Timedelta(days=choice.days)
    ] * 2
    assert choice.to_dict()["days"] == choice.days and len(choice.to_dict()["trials"]) == 3
    again = search_history(d, d.end, (2, 3, 4), 2, history, FAST, **kw)
    assert [t.to_dict() | {"seconds": 0} for t in again.trials] == [
        t.to_dict() | {"seconds": 0} for t in choice.trials
    ]
    # The search on the chosen folds takes the defaults' score from the history search
    # instead of boosting them again: the same numbers as boosting them.
    reused = search(choice.folds, FAST, 3, 30, 5, TINY_SPACE, base_scored=choice.scored)
    fresh = search(choice.folds, FAST, 3, 30, 5, TINY_SPACE)
    assert choice.scored is not None and choice.scored.days == choice.days
    first = reused.trials[0]
    assert (first.validation_ap, first.best_iteration, first.fold_aps) == (
        choice.scored.validation_ap,
        choice.scored.best_iteration,
        choice.scored.fold_aps,
    )
    assert [t.to_dict() | {"seconds": 0} for t in reused.trials] == [
        t.to_dict() | {"seconds": 0} for t in fresh.trials
    ]
    single = search_history(d, d.end, (2,), 2, history, FAST, **kw)
    assert single.days == 2 and single.trials == () and len(single.folds) == 2
    assert single.scored is None
    with pytest.raises(ValueError):
        search_history(d, d.end, (), 2, history, FAST, **kw)


def test_cross_validate_shares_one_round_across_folds() -> None:
    folds = toy_folds(toy(6000, customers=3000))
    rounds, ap, per_fold = cross_validate(FAST, folds, max_rounds=40, patience=5)
    assert 1 <= rounds <= 40 and len(per_fold) == len(folds)
    assert ap == pytest.approx(float(np.mean(per_fold)))
    assert 0 < ap <= 1


def test_search_is_deterministic_and_picks_the_best_mean_validation_ap() -> None:
    folds = toy_folds(toy(6000, customers=3000))
    run = lambda: search(folds, FAST, n_trials=4, max_rounds=40, patience=5, space=TINY_SPACE)  # noqa: E731
    result = run()
    assert len(result.trials) == 4
    assert result.best.validation_ap == max(t.validation_ap for t in result.trials)
    assert result.trials[0].params == {k: FAST[k] for k in TINY_SPACE}
    assert result.trials[1].params["monotone"] is True
    assert [t.to_dict() | {"seconds": 0} for t in run().trials] == [
        t.to_dict() | {"seconds": 0} for t in result.trials
    ]
    cost = result.monotone_cost()
    on = max(t.validation_ap for t in result.trials if t.params["monotone"])
    off = max(t.validation_ap for t in result.trials if not t.params["monotone"])
    assert cost == pytest.approx(off - on)
    assert [f["validation"] for f in result.to_dict()["folds"]] == [
        "2018-07-30..2018-07-31",
        "2018-07-28..2018-07-29",
    ]


def test_the_monotone_choice_gives_a_model_monotone_in_terminal_risk() -> None:
    d = toy(6000)
    booster = refit(d, {**FAST, "monotone": True}, 40, progress=False)
    X = toy(500, seed=3).X
    before = booster.predict(X.to_numpy())
    for col in MONOTONE_INCREASING:
        raised = X.copy()
        raised[col] = np.minimum(raised[col] + 0.3, 1.0)
        assert (booster.predict(raised.to_numpy()) - before).min() >= -1e-12, col


# Linear trees: a leaf's output is a constant plus coefficients (it was once averaged wrongly,
# only the leaf values divided: raw scores off by up to 6 on a toy set).
@pytest.mark.parametrize("linear_tree", [False, True])
def test_a_seed_averaged_refit_is_one_model_scoring_the_mean_log_odds(linear_tree: bool) -> None:
    d = toy(6000)
    params = {**FAST, "seed": 4, "linear_tree": linear_tree}
    singles = [refit(d, {**params, "seed": s}, 30, progress=False) for s in (4, 5, 6)]
    averaged = refit(d, params, 30, progress=False, n_seeds=3)
    X = toy(500, seed=3).X.to_numpy()
    raws = np.array([b.predict(X, raw_score=True) for b in singles])
    # The seeds differ (else averaging them would change nothing).
    assert np.abs(raws[0] - raws[1]).max() > 1e-3
    np.testing.assert_allclose(averaged.predict(X, raw_score=True), raws.mean(axis=0), atol=1e-9)
    if not linear_tree:
        # Feature contributions (LightGBM has none for linear trees) add up to the raw score.
        contrib = averaged.predict(X, pred_contrib=True).sum(axis=1)
        np.testing.assert_allclose(contrib, raws.mean(axis=0), atol=1e-9)
    # It is saved and loaded as one LightGBM text model.
    loaded = lgb.Booster(model_str=averaged.model_to_string())
    assert loaded.num_trees() == 3 * 30
    np.testing.assert_allclose(loaded.predict(X), averaged.predict(X), atol=1e-12)
    assert average_boosters(singles[:1]).num_trees() == 30
    with pytest.raises(ValueError, match="no boosters"):
        average_boosters([])


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


def test_concat_and_subset_keep_rows_aligned() -> None:
    d = toy(1000)
    mid = d.start + pd.Timedelta(days=3)
    a, b = d.slice_time(d.start, mid), d.slice_time(mid, d.end)
    joined = concat_datasets([a, b])
    assert joined.start == d.start and joined.end == d.end
    pd.testing.assert_frame_equal(joined.X, d.X)
    pd.testing.assert_frame_equal(joined.ids, d.ids)
    with pytest.raises(ValueError, match="contiguous"):
        concat_datasets([b, a])
    keep = (d.y == 1).to_numpy()
    sub = d.subset(keep)
    assert len(sub) == keep.sum() and (sub.y == 1).all()
    assert sub.ids["transaction_id"].tolist() == d.ids.loc[keep, "transaction_id"].tolist()


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
        "created_at": "2026-11-26T01:36:37+00:00",
        "feature_service": "fraud_model_v1",
        "features": list(MODEL_FEATURES),
        "training_window": {"start": "2018-07-25", "end_inclusive": "2018-07-31"},
        "test_window": {"start": "2018-08-08", "end_inclusive": "2018-08-14"},
        "n_train": 100,
        "n_train_frauds": 3,
        "best_iteration": 42,
        "monotone_increasing": [],
        "data_fingerprint": "ab" * 32,
        "tuning": {
            "trials": [
                {
                    "params": {"num_leaves": 31, "monotone": True},
                    "validation_ap": 0.5,
                    "fold_aps": [0.45, 0.55],
                    "best_iteration": 40,
                },
                {
                    "params": {"num_leaves": 7, "monotone": False},
                    "validation_ap": 0.6,
                    "fold_aps": [0.58, 0.62],
                    "best_iteration": 42,
                },
            ],
            "best": {
                "params": {"num_leaves": 7, "monotone": False},
                "validation_ap": 0.6,
                "best_iteration": 42,
            },
            "folds": [
                {
                    "fit": "2018-07-11..2018-07-17",
                    "validation": "2018-07-25..2018-07-31",
                    "fit_rows": 70,
                    "fit_frauds": 2,
                    "validation_rows": 60,
                    "validation_frauds": 1,
                    "removed_known_compromised": 3,
                }
            ],
            "monotone_cost": 0.1,
            "history": {
                "days": 14,
                "trials": [
                    {
                        "days": 7,
                        "validation_ap": 0.55,
                        "best_iteration": 30,
                        "fold_aps": [0.5, 0.6],
                    },
                    {
                        "days": 14,
                        "validation_ap": 0.6,
                        "best_iteration": 42,
                        "fold_aps": [0.58, 0.62],
                    },
                ],
            },
        },
        "fit_window": {"start": "2018-07-18", "end_inclusive": "2018-07-31"},
        "uncertainty": {
            "primary": "lightgbm",
            "replicates": 500,
            "n_cards": 80,
            "k": 100,
            "interval": [2.5, 97.5],
            "metrics": {"roc_auc": {"lightgbm": {"value": 0.88, "low": 0.85, "high": 0.91}}},
            "differences": {},
            "card_precision_ceiling": 0.4429,
        },
    }
    text = render_report(ModelCard.from_dict(meta), MODELS, importance, {"join": 1.0}, plots)
    assert text.startswith("# fraud v0007")
    assert markdown_table(MODELS) in text
    for path in plots.values():
        assert f"]({path.name})" in text
    assert "| 7 | False | 0.6000 (chosen) | 0.580, 0.620 | 42 |" in text
    assert "| 31 | True | 0.5000 | 0.450, 0.550 | 40 |" in text
    assert "| 0 | 2018-07-11..2018-07-17 | 2018-07-25..2018-07-31 | 70 (2) | 60 (1) | 3 |" in text
    assert "**Chosen:** num_leaves=7, monotone=False, 42 rounds" in text
    assert "on terminal risk: dropped.** Best mean validation AP without them minus" in text
    assert "+0.1000" in text
    assert "monotone increasing in nothing" in text
    assert "| 14 | 0.6000 (chosen) | 0.580, 0.620 | 42 |" in text
    assert "| 7 | 0.5500 | 0.500, 0.600 | 30 |" in text
    assert (
        "fitted on 2018-07-18 .. 2018-07-31, the history the folds chose (100 transactions" in text
    )
    assert "| lightgbm | 0.8800 [0.8500, 0.9100] | n/a [n/a, n/a] | n/a [n/a, n/a] |" in text
    assert "every card with a fraud that day first: 0.4429" in text
    assert "terminal_risk_7d" in text and "| **total** | **1.0** |" in text


def test_write_plots_skips_curves_without_both_classes(tmp_path: Path) -> None:
    importance = pd.Series(1.0 / len(MODEL_FEATURES), index=list(MODEL_FEATURES))
    plots = write_plots(
        tmp_path, np.zeros(50, int), {"lightgbm": np.linspace(0, 1, 50)}, importance
    )
    assert set(plots) == {"feature_importance", "score_distribution"}


def test_train_result_prints_the_side_by_side_table_and_times(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    test = pd.DataFrame(
        {
            "customer_id": rng.integers(0, 80, 400),
            "tx_datetime": pd.Timestamp("2018-08-08", tz="UTC")
            + pd.to_timedelta(rng.integers(0, 2 * 86_400, 400), unit="s"),
            "is_fraud": (rng.random(400) < 0.1).astype(int),
        }
    )
    scores = {"lightgbm": test["is_fraud"] + rng.random(400), "random_forest": rng.random(400)}
    sure = paired_bootstrap(test, {k: np.asarray(v) for k, v in scores.items()}, "lightgbm", 40)
    result = TrainResult(
        version="v0003",
        model_dir=tmp_path,
        metrics=MODELS["lightgbm"],
        best_iteration=10,
        train_window=("2018-07-25", "2018-07-31"),
        test_window=("2018-08-08", "2018-08-14"),
        report_path=tmp_path / "report.md",
        card=ModelCard("fraud", "v0003", datetime(2026, 11, 26, tzinfo=UTC)),
        model_metrics=MODELS,
        timings={"point-in-time join": 30.0, "fit lightgbm": 1.5},
        uncertainty=sure,
    )
    text = str(result)
    assert "fraud v0003" in text and text_table(MODELS) in text
    for line in difference_lines(sure):
        assert line in text
    assert "point-in-time join 30.0s" in text and "total 31.5s" in text
    console = Console(width=120, record=True)
    console.print(result)
    out = console.export_text()
    assert "random_forest" in out and "0.7000" in out and "31.5" in out
    assert "lightgbm - random_forest: ROC AUC +" in out and "40 replicates" in out


@pytest.mark.parametrize("value", ["7,x", "0,14", ","])
def test_rtpipe_train_refuses_bad_history_days_before_reading_anything(
    value: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from stages.cli import app

    monkeypatch.chdir(tmp_path)  # nothing to read here: a bad option must fail first
    result = CliRunner().invoke(app, ["train", "--history-days", value])
    assert result.exit_code == 2
    assert "--history-days" in result.output
    assert not (tmp_path / ".rtpipe").exists()

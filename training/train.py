"""Train, evaluate, register and promote the fraud model (SIMULATOR.md's evaluation protocol).

Windows, for ``train_start`` = day ``s``: training ``[s, s + train_days)``, then a gap of
``delay_days`` (labels of the last training days are only known by then), then the test window
``[s + train_days + delay_days, ... + test_days)``.

Steps (each timed; the times are in the result, the report and the log):

1. load the transactions; 2. build both windows' features by Feast point-in-time joins
   (``training.dataset``);
3. tune LightGBM on time-ordered validation folds that replay the protocol on the history
   ending with the training window (``training.tune``: fit 7 days, 7-day gap, validate 7 days,
   three folds, known compromised cards removed from the validation days, early stopping and
   selection on the mean validation AP); their features come from the same Feast joins. The
   winner is refitted with the number of rounds the folds agreed on, as the average of
   :data:`REFIT_SEEDS` boosters of consecutive seeds (one model). Before that search the folds
   choose how many days of history, ending with the training window, the model is fitted on
   (:data:`HISTORY_DAYS`, ``tune.search_history``); the search runs on that length's folds;
4. fit the baselines on the same rows and features (``training.baselines``);
5. score the test window with every model and evaluate (``training.evaluate``): the test window
   is only ever scored, after every model is final;
6. register the LightGBM model (text format) with its metadata, write the report and plots into
   the version folder (``training.report``), promote.

**Monotone constraints.** Being non-decreasing in the terminal risk features
(:data:`MONOTONE_INCREASING`) is one of the searched choices, not imposed; the report states
what it cost on the validation folds (about 0.09 mean validation AP on the reference data, so
the search drops it). The data explain why: a terminal is compromised for 28 days, so with the
1- and 7-day rates unchanged a higher 30-day rate marks a compromise that is over, and forcing
the score up there mistakes it for a live one. ``tests/model`` checks what the model does
promise: more recent terminal fraud raises scores on average, recent outweighs stale.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightgbm as lgb
import numpy as np
import pandas as pd
from lightgbm.basic import _LIB, _safe_call
from rich.console import Group
from rich.table import Table
from rich.text import Text
from tqdm.auto import tqdm

from stages.shared.schemas import service_features
from training import registry, tune
from training.baselines import BASELINES, BaselineName, fit_baselines
from training.card import ModelCard, Window
from training.dataset import Dataset, build_datasets, concat_datasets, utc_day
from training.evaluate import Metrics, evaluate, known_compromised_mask
from training.reference import build_reference
from training.report import (
    PRIMARY_MODEL,
    REPORT_FILE,
    render_report,
    rich_table,
    text_table,
    write_plots,
)
from training.simulate import read_dataset
from training.uncertainty import (
    DEFAULT_REPLICATES,
    Uncertainty,
    difference_lines,
    paired_bootstrap,
)

if TYPE_CHECKING:
    from feast import FeatureStore

    from stages.shared.settings import Settings

logger = logging.getLogger(__name__)

MONOTONE_INCREASING = tune.MONOTONE_INCREASING
# The first candidate of the search (the best mean fold AP of a manual exploration on the
# reference history's folds); "monotone" is the search's switch, see tune.lightgbm_params.
DEFAULT_PARAMS: dict[str, Any] = {
    "objective": "binary",
    "learning_rate": 0.02,
    "num_leaves": 15,
    "min_child_samples": 20,
    "feature_fraction": 0.8,
    "bagging_fraction": 0.8,
    "bagging_freq": 1,
    "max_bin": 1023,
    "scale_pos_weight": 1.0,
    "lambda_l2": 0.0,
    "monotone": False,
    "metric": "average_precision",
    "verbose": -1,
    "seed": 0,
    "deterministic": True,
    "num_threads": 2,
}
MAX_ROUNDS = tune.MAX_ROUNDS
EARLY_STOPPING_ROUNDS = 100
DEFAULT_TRIALS = tune.DEFAULT_TRIALS
DEFAULT_FOLDS = tune.DEFAULT_FOLDS
# The served model averages boosters of this many seeds, refitted with the chosen parameters
# and rounds. On the reference history's three folds (the chosen v1 parameters, 250 rounds)
# five seeds against one: mean validation AP 0.6906 vs 0.6874, ROC AUC 0.8770 vs 0.8759, card
# precision@100 0.3019 vs 0.3029: less variance from row and feature sampling.
REFIT_SEEDS = 5
# Days of history before the end of the training window that the model may be fitted on; the
# folds choose one (tune.search_history), the training window's own length always among them.
# The test rows do not depend on it: known compromised cards still come from the training
# window. On the reference data the folds' AP rises with every length here (v1 0.6873 at 7
# days to 0.7128 at 42; README, "Model").
HISTORY_DAYS: tuple[int, ...] = (7, 14, 28, 42)


class StepTimer:
    """Wall seconds per named step, in the order the steps ran."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, step: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[step] = self.seconds.get(step, 0.0) + time.perf_counter() - t0
            logger.info("step %s: %.1f s", step, self.seconds[step])


@dataclass(frozen=True, slots=True)
class TrainResult:
    """What one training run produced.

    ``metrics`` is the registered LightGBM's; ``model_metrics`` has every model's, LightGBM
    first, in report order; ``timings`` the wall seconds per step.
    """

    version: str
    model_dir: Path
    metrics: Metrics
    best_iteration: int
    train_window: tuple[str, str]
    test_window: tuple[str, str]
    report_path: Path
    predictions_path: Path | None = None
    card: ModelCard | None = None
    model_metrics: dict[str, Metrics] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    plots: dict[str, Path] = field(default_factory=dict)
    uncertainty: Uncertainty | None = None

    def _headline(self) -> str:
        fitted = self.card.wider_fit_window if self.card else None
        history = (
            f" (fitted on {fitted.start}..{fitted.end_inclusive}, the history the folds chose)"
            if fitted is not None
            else ""
        )
        return (
            f"{self.card.name if self.card else 'model'} {self.version}: trained on "
            f"{self.train_window[0]}..{self.train_window[1]}{history}, tested on "
            f"{self.test_window[0]}..{self.test_window[1]}; report {self.report_path}"
        )

    def __str__(self) -> str:
        metrics = self.model_metrics or {PRIMARY_MODEL: self.metrics}
        steps = ", ".join(f"{k} {v:.1f}s" for k, v in self.timings.items())
        total = sum(self.timings.values())
        return "\n".join(
            [
                self._headline(),
                text_table(metrics),
                *(difference_lines(self.uncertainty) if self.uncertainty else []),
                f"wall time: {steps} (total {total:.1f}s)" if self.timings else "",
            ]
        ).rstrip()

    def __rich__(self) -> Group:
        metrics = self.model_metrics or {PRIMARY_MODEL: self.metrics}
        parts: list[Any] = [
            Text(self._headline()),
            rich_table(metrics, title="test window, known compromised cards removed"),
        ]
        if self.uncertainty:
            parts.append(Text("\n".join(difference_lines(self.uncertainty))))
        if self.timings:
            t = Table(title="wall time per step")
            t.add_column("step")
            t.add_column("seconds", justify="right")
            for step, sec in self.timings.items():
                t.add_row(step, f"{sec:.1f}")
            t.add_row("[bold]total[/bold]", f"[bold]{sum(self.timings.values()):.1f}[/bold]")
            parts.append(t)
        return Group(*parts)


def fingerprint(ds: Dataset) -> str:
    """sha256 over the training rows (ids, features, labels): identifies the exact data used."""
    h = hashlib.sha256()
    for frame in (ds.ids.drop(columns="tx_datetime"), ds.X, ds.y.to_frame()):
        h.update(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes())
    h.update(ds.ids["tx_datetime"].astype("int64").to_numpy().tobytes())
    return h.hexdigest()


def _tqdm_callback(bar: tqdm) -> Any:
    def callback(env: lgb.callback.CallbackEnv) -> None:
        bar.update(1)

    return callback


def average_boosters(boosters: list[lgb.Booster]) -> lgb.Booster:
    """One booster whose raw score is the mean of ``boosters``' raw scores.

    The trees of all of them in one model, every leaf's output divided by their number:
    served, saved and loaded like any single LightGBM model (its probability is the sigmoid
    of the mean log-odds). LightGBM has no public merge: ``LGBM_BoosterMerge`` is the C API
    call its own ``Booster.refit`` uses to copy trees between boosters. A linear tree's leaf
    outputs its constant plus coefficients times the inputs (``leaf_const``, ``leaf_coeff``
    in the model text; ``set_leaf_output`` changes neither), so the division is done on the
    model text, where every part of a leaf's output is.

    Raises:
        ValueError: for an empty list.
    """
    if not boosters:
        raise ValueError("no boosters to average")
    merged = lgb.Booster(model_str=boosters[0].model_to_string())
    if len(boosters) == 1:
        return merged
    for other in boosters[1:]:
        _safe_call(_LIB.LGBM_BoosterMerge(merged._handle, other._handle))
    return lgb.Booster(model_str=_scale_leaf_outputs(merged.model_to_string(), len(boosters)))


# The lines of a tree in LightGBM's model text that hold its leaves' outputs (and its inner
# nodes' would-be outputs, kept consistent with them).
_LEAF_OUTPUT_KEYS = ("leaf_value=", "leaf_const=", "leaf_coeff=", "internal_value=")


def _scale_leaf_outputs(model: str, k: int) -> str:
    """``model`` (LightGBM's model text) with every leaf output divided by ``k``.

    The header's ``tree_sizes`` (each tree's length in bytes, for a parallel parse) is
    dropped, since the new numbers change the lengths: LightGBM then parses the trees one
    after another, and writes the sizes again when the model is saved.
    """
    lines = model.split("\n")
    in_trees = False
    for i, line in enumerate(lines):
        if not in_trees and line.startswith("tree_sizes="):
            lines[i] = ""
        elif line.startswith("Tree="):
            in_trees = True
        elif line.startswith("end of trees"):
            in_trees = False
        elif in_trees and line.startswith(_LEAF_OUTPUT_KEYS):
            key, _, values = line.partition("=")
            lines[i] = f"{key}=" + " ".join(repr(float(v) / k) for v in values.split())
    return "\n".join(lines)


def refit(
    train: Dataset,
    params: dict[str, Any],
    rounds: int,
    progress: bool = True,
    n_seeds: int = 1,
) -> lgb.Booster:
    """LightGBM on the whole training window with a fixed number of rounds.

    With ``n_seeds`` > 1, that many boosters (seeds ``params["seed"]``, +1, ...; they differ
    by their row and feature sampling) averaged into one by :func:`average_boosters`.
    """
    ds_params = {"max_bin": params["max_bin"]} if "max_bin" in params else None
    features = list(train.X.columns)
    dall = lgb.Dataset(
        train.X, train.y, feature_name=features, params=ds_params, free_raw_data=False
    )
    lgb_params = tune.lightgbm_params(params, features)
    seed = int(lgb_params.get("seed", 0))
    boosters = []
    with tqdm(total=rounds * n_seeds, desc="boosting (refit)", disable=not progress) as bar:
        for i in range(n_seeds):
            boosters.append(
                lgb.train(
                    {**lgb_params, "seed": seed + i},
                    dall,
                    num_boost_round=rounds,
                    callbacks=[_tqdm_callback(bar)],
                )
            )
    return boosters[0] if n_seeds == 1 else average_boosters(boosters)


def fit(
    train: Dataset,
    validation_days: int = 2,
    params: dict[str, Any] | None = None,
    progress: bool = True,
) -> tuple[lgb.Booster, int]:
    """Early-stop one configuration on the last ``validation_days`` of ``train``, then refit.

    Returns:
        The final booster and the number of boosting rounds it has.

    Raises:
        tune.ValidationSplitError: if the split has no rows or no fraud on either side.
    """
    full = {**DEFAULT_PARAMS, **(params or {})}
    fit_part, val_part = tune.split_validation(train, validation_days)
    _, best, ap = tune.early_stopped(full, fit_part, val_part, MAX_ROUNDS, EARLY_STOPPING_ROUNDS)
    logger.info("early stopping: best iteration %d, validation AP %.4f", best, ap)
    return refit(train, full, best, progress), best


def train(
    settings: Settings,
    train_start: str | date | pd.Timestamp,
    train_days: int = 7,
    delay_days: int = 7,
    test_days: int = 7,
    predictions_out: Path | None = None,
    *,
    n_folds: int = DEFAULT_FOLDS,
    params: dict[str, Any] | None = None,
    store: FeatureStore | None = None,
    transactions: pd.DataFrame | None = None,
    promote: bool = True,
    progress: bool = True,
    n_trials: int = DEFAULT_TRIALS,
    refit_seeds: int = REFIT_SEEDS,
    baselines: tuple[BaselineName, ...] = BASELINES,
    plots: bool = True,
    feature_service: str | None = None,
    bootstrap_replicates: int = DEFAULT_REPLICATES,
    history_days: Sequence[int] | None = None,
) -> TrainResult:
    """Build the datasets through Feast, tune and train, compare, register and promote.

    Args:
        settings: process settings (data, registry, feature service and model name).
        train_start: first training day (UTC), e.g. ``"2018-07-25"``.
        train_days: training window length in days.
        delay_days: gap between training and test (the label delay).
        test_days: test window length in days.
        predictions_out: if set, write the LightGBM test predictions there (Parquet:
            transaction_id, customer_id, tx_datetime, is_fraud, score).
        n_folds: validation folds of the search (``tune.validation_folds``: each replays the
            protocol's train/gap/test lengths, the latest validating on the training window).
        params: LightGBM parameters overriding :data:`DEFAULT_PARAMS` (before the search).
        store: an open feature store (default: ``open_feature_store(settings)``).
        transactions: the transactions (default: read from ``settings.data_dir``).
        promote: promote the new version to current.
        progress: show progress bars.
        n_trials: LightGBM configurations tried (1: the defaults only, no search).
        refit_seeds: boosters of consecutive seeds averaged into the registered model
            (:func:`refit`; 1: a single booster).
        baselines: baseline models to train and report next to LightGBM.
        plots: write the PNG plots (and link them from the report).
        feature_service: the feature service to train with (its features, in
            ``stages.shared.schemas.service_features`` order, are the model's inputs and the
            metadata records it); default ``settings.prediction.feature_service``.
        bootstrap_replicates: replicates of the card bootstrap that puts an interval on
            every test metric and on LightGBM's difference to each baseline
            (:func:`training.uncertainty.paired_bootstrap`).
        history_days: lengths of fitting history (days up to the end of the training window)
            for the folds to choose from (``tune.search_history``; default
            :data:`HISTORY_DAYS`); ``train_days`` is always one, and a length whose folds
            would start before the first transaction is skipped. ``(train_days,)``: fit on the
            training window only, no choice.

    Returns:
        The registered version, the metrics of every model, where the files are, step times.
    """
    timer = StepTimer()
    with timer("load transactions"):
        if store is None:
            from stages.shared.feast_store import open_feature_store

            store = open_feature_store(settings)
        tx = transactions if transactions is not None else read_dataset(settings.data_dir)
    start = utc_day(pd.Timestamp(train_start))
    train_end = start + pd.Timedelta(days=train_days)
    test_start = train_end + pd.Timedelta(days=delay_days)
    service = feature_service or settings.prediction.feature_service
    features = service_features(service)
    first_day = utc_day(pd.Timestamp(tx["tx_datetime"].min()).ceil("D"))
    lengths = tune.feasible_history(
        HISTORY_DAYS if history_days is None else history_days,
        train_days,
        train_end,
        first_day,
        n_folds,
        delay_days,
        test_days,
    )
    # The longest length's folds start first (and before its own fitting rows).
    longest = tune.validation_folds(train_end, n_folds, max(lengths), delay_days, test_days)
    first = min(tune.history_start(longest), start)
    windows: list[tuple[pd.Timestamp, int]] = [(start, train_days), (test_start, test_days)]
    if first < start:  # the folds' days before the training window, joined like the rest
        windows.append((first, (start - first).days))
    with timer("point-in-time join"):
        train_ds, test_ds, *earlier = build_datasets(store, tx, windows, service, progress=progress)
    logger.info(
        "train %d rows (%d frauds), test %d rows", len(train_ds), train_ds.y.sum(), len(test_ds)
    )

    base = {**DEFAULT_PARAMS, **(params or {})}
    with timer("tune lightgbm"):
        everything = concat_datasets([*earlier, train_ds])
        chosen = tune.search_history(
            everything,
            train_end,
            lengths,
            train_days,
            tx,
            base,
            n_folds,
            delay_days,
            test_days,
            MAX_ROUNDS,
            tune.SEARCH_PATIENCE,
        )
        search = tune.search(
            chosen.folds,
            base,
            n_trials,
            MAX_ROUNDS,
            tune.SEARCH_PATIENCE,
            base_scored=chosen.scored,
        )
    final_params = {**base, **search.best.params}
    best = search.best.best_iteration
    # The rows the model and the baselines are fitted on: the chosen history, ending with the
    # training window (the training window itself when the folds chose its length).
    fit_ds = (
        train_ds
        if chosen.days == train_days
        else everything.slice_time(train_end - pd.Timedelta(days=chosen.days), train_end)
    )
    logger.info("fitting on %d days (%d rows, %d frauds)", chosen.days, len(fit_ds), fit_ds.y.sum())
    with timer("fit lightgbm"):
        booster = refit(fit_ds, final_params, best, progress, n_seeds=refit_seeds)
    with timer("fit baselines"):
        fitted = fit_baselines(fit_ds.X, fit_ds.y, baselines, n_jobs=base["num_threads"])

    with timer("evaluate"):
        threads = int(base["num_threads"])
        train_scores = booster.predict(fit_ds.X.to_numpy(), num_threads=threads)
        test_X = test_ds.X.to_numpy()
        scores: dict[str, np.ndarray] = {
            PRIMARY_MODEL: np.asarray(booster.predict(test_X, num_threads=threads))
        }
        scores.update({b.name: b.predict(test_X) for b in fitted})
        history = tx.loc[
            (tx["tx_datetime"] >= start) & (tx["tx_datetime"] < test_ds.end),
            ["customer_id", "tx_datetime", "is_fraud"],
        ]
        base_frame = test_ds.ids.assign(is_fraud=test_ds.y.to_numpy())
        model_metrics = {
            name: evaluate(
                base_frame.assign(score=s), history, start, train_ds.end, delay_days=delay_days
            )
            for name, s in scores.items()
        }
        metrics = model_metrics[PRIMARY_MODEL]
        kept = ~known_compromised_mask(base_frame, history, start, train_ds.end, delay_days)
    sure: Uncertainty | None = None
    if kept.any():  # a test window left without rows has nothing to redraw
        with timer("bootstrap"):
            sure = paired_bootstrap(
                base_frame.loc[kept].reset_index(drop=True),
                {name: s[kept] for name, s in scores.items()},
                PRIMARY_MODEL,
                bootstrap_replicates,
                k=metrics.k,
            )

    gain = pd.Series(booster.feature_importance("gain"), index=list(features))
    importance = (gain / gain.sum() if gain.sum() > 0 else gain).sort_values(ascending=False)
    day = pd.Timedelta(days=1)
    train_window = Window(start.date(), (train_ds.end - day).date())
    fit_window = Window(fit_ds.start.date(), (fit_ds.end - day).date())
    test_window = Window(test_start.date(), (test_ds.end - day).date())
    meta: dict[str, Any] = {
        "model_format": "lightgbm-text",
        "feature_service": service,
        "features": list(features),
        "training_window": train_window.to_dict(),
        "fit_window": fit_window.to_dict(),
        "test_window": test_window.to_dict(),
        "delay_days": delay_days,
        "best_iteration": best,
        "refit_seeds": refit_seeds,
        "params": final_params,
        "lightgbm_params": tune.lightgbm_params(final_params, features),
        "monotone_increasing": list(MONOTONE_INCREASING) if final_params.get("monotone") else [],
        "tuning": {**search.to_dict(), "refit_seeds": refit_seeds, "history": chosen.to_dict()},
        "metrics": metrics.to_dict(),
        "model_metrics": {name: m.to_dict() for name, m in model_metrics.items()},
        "uncertainty": sure.to_dict() if sure is not None else None,
        "n_train": len(fit_ds),
        "n_train_frauds": int(fit_ds.y.sum()),
        "data_fingerprint": fingerprint(fit_ds),
        "feature_importance_gain": {k: float(v) for k, v in importance.items()},
        "reference": build_reference(fit_ds.X, np.asarray(train_scores), features),
    }
    with timer("register"):
        mv = registry.register(
            settings.registry_dir, settings.prediction.model_name, booster.model_to_string(), meta
        )
    # The report names the version, which register() assigns; it and the plots are added to
    # the version folder right after (model.txt and metadata.json are already final).
    with timer("report"):
        plot_paths: dict[str, Path] = {}
        if plots:
            y_kept = test_ds.y.to_numpy()[kept]
            plot_paths = write_plots(
                mv.path, y_kept, {n: s[kept] for n, s in scores.items()}, importance
            )
        report_path = mv.path / REPORT_FILE
        # Timings up to here; the report step's own time is in the result and the log.
        report_path.write_text(
            render_report(mv.card, model_metrics, importance, dict(timer.seconds), plot_paths)
        )
    if promote:
        registry.promote(settings.registry_dir, settings.prediction.model_name, mv.version)

    predictions_path = None
    if predictions_out is not None:
        predictions_path = Path(predictions_out)
        predictions_path.parent.mkdir(parents=True, exist_ok=True)
        scored = base_frame.assign(score=scores[PRIMARY_MODEL])
        scored[["transaction_id", "customer_id", "tx_datetime", "is_fraud", "score"]].to_parquet(
            predictions_path, index=False
        )
        logger.info("wrote %d test predictions to %s", len(scored), predictions_path)

    result = TrainResult(
        version=mv.version,
        model_dir=mv.path,
        metrics=metrics,
        best_iteration=best,
        train_window=(train_window.start.isoformat(), train_window.end_inclusive.isoformat()),
        test_window=(test_window.start.isoformat(), test_window.end_inclusive.isoformat()),
        report_path=report_path,
        predictions_path=predictions_path,
        card=mv.card,
        model_metrics=model_metrics,
        timings=dict(timer.seconds),
        plots=plot_paths,
        uncertainty=sure,
    )
    # The callers (CLI, demo) print the tables; the log keeps a line.
    logger.info("trained %s", mv.version)
    logger.debug("%s", result)
    return result

"""LightGBM hyper-parameter search on time-ordered validation folds before the test window.

The evaluation protocol (train 7 days, 7-day gap, test 7 days) is replayed on the history that
ends with the training window: fold ``i`` validates on the ``val_days`` ending ``i * val_days``
before the end of the training window, after a ``gap_days`` gap (the label delay) following its
own ``fit_days`` of fitting rows. At the defaults, for the reference split (training
2018-07-25..07-31)::

    fold 0: fit 07-11..07-17, gap 07-18..07-24, validate 07-25..07-31
    fold 1: fit 07-04..07-10, gap 07-11..07-17, validate 07-18..07-24
    fold 2: fit 06-27..07-03, gap 07-04..07-10, validate 07-11..07-17

Every validation day is at or before the last training day, so the test window is never seen.
As on the test window, the cards already known to be compromised are removed from each
validation day (:func:`training.evaluate.known_compromised_mask`), so that the validation AP
measures what the test AP measures. Before the search, :func:`search_history` chooses how many
days the folds (and the final model) are fitted on; for it the known cards come from the last
training-window length of each fit window, as the test window's come from the training window,
so every length is scored on the same validation rows.

Each candidate is boosted on every fold with early stopping on the validation AP; its score is
the best value of the *mean* AP curve over the folds (one number of rounds for all folds, the
one the refit uses: each fold fits on as many days as the final model). The best mean
validation AP wins; ties keep the earlier candidate. The candidates are deterministic: the
defaults, the defaults with the monotone constraints on terminal risk (so the constraint's cost
is always measured against the same other settings), then distinct seeded draws from
:data:`SEARCH_SPACE`.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightgbm as lgb
import numpy as np
import pandas as pd

from stages.shared.errors import RtpipeError
from stages.shared.schemas import MODEL_FEATURES
from training.dataset import Dataset
from training.evaluate import known_compromised_mask

logger = logging.getLogger(__name__)

# Non-decreasing in these when the "monotone" choice is on: more known fraud on the terminal
# never lowers the score.
MONOTONE_INCREASING: tuple[str, ...] = ("terminal_risk_1d", "terminal_risk_7d", "terminal_risk_30d")
# "intermediate" costs less accuracy than "basic" at a fraction of "advanced"'s time.
MONOTONE_METHOD = "intermediate"

SEARCH_SPACE: dict[str, tuple[Any, ...]] = {
    "num_leaves": (7, 15, 31),
    "learning_rate": (0.02, 0.05),
    "min_child_samples": (20, 50, 100),
    "feature_fraction": (0.6, 0.8, 1.0),
    "bagging_fraction": (0.8, 1.0),
    # Finer histograms: amounts (cents) and terminal fraud rates have many distinct values.
    "max_bin": (255, 1023),
    "scale_pos_weight": (1.0, 3.0),
    # Monotone non-decreasing in the terminal risk features (MONOTONE_INCREASING) or not.
    "monotone": (False, True),
}
DEFAULT_TRIALS = 6
DEFAULT_FOLDS = 3
MAX_ROUNDS = 2000
# Early-stopping patience while searching (the refit uses the round the folds agree on).
SEARCH_PATIENCE = 50
VALIDATION_METRIC = "average_precision"


class ValidationSplitError(RtpipeError, ValueError):
    """The history cannot be split into fit and validation rows."""

    def __init__(self, detail: str) -> None:
        super().__init__(f"time-based validation split: {detail}")
        self.detail = detail


def lightgbm_params(
    params: Mapping[str, Any], features: Sequence[str] = MODEL_FEATURES
) -> dict[str, Any]:
    """LightGBM's parameters for a configuration: the ``monotone`` choice becomes constraints.

    ``monotone`` True sets ``monotone_constraints`` (1 on :data:`MONOTONE_INCREASING`, in
    ``features`` order, the model's columns) and :data:`MONOTONE_METHOD`; False (or absent)
    removes them.
    """
    out = {k: v for k, v in params.items() if k != "monotone"}
    out.pop("monotone_constraints", None)
    out.pop("monotone_constraints_method", None)
    if params.get("monotone", False):
        out["monotone_constraints"] = [1 if f in MONOTONE_INCREASING else 0 for f in features]
        out["monotone_constraints_method"] = MONOTONE_METHOD
    return out


@dataclass(frozen=True, slots=True)
class Fold:
    """One replay of the protocol: fit on ``[fit_start, fit_end)``, validate on the val window."""

    fit_start: pd.Timestamp
    fit_end: pd.Timestamp
    val_start: pd.Timestamp
    val_end: pd.Timestamp

    def to_dict(self) -> dict[str, str]:
        day = pd.Timedelta(days=1)
        return {
            "fit": f"{self.fit_start.date()}..{(self.fit_end - day).date()}",
            "validation": f"{self.val_start.date()}..{(self.val_end - day).date()}",
        }


def validation_folds(
    train_end: pd.Timestamp,
    n_folds: int = DEFAULT_FOLDS,
    fit_days: int = 7,
    gap_days: int = 7,
    val_days: int = 7,
) -> list[Fold]:
    """Folds whose validation windows tile the ``n_folds * val_days`` days before ``train_end``.

    Fold 0 is the latest (its validation window ends at ``train_end``, exclusive).

    Raises:
        ValueError: for ``n_folds`` or a length below 1 (``gap_days`` may be 0).
    """
    if n_folds < 1 or fit_days < 1 or val_days < 1 or gap_days < 0:
        raise ValueError(f"bad fold layout: {n_folds=} {fit_days=} {gap_days=} {val_days=}")
    day = pd.Timedelta(days=1)
    folds = []
    for i in range(n_folds):
        val_end = train_end - i * val_days * day
        val_start = val_end - val_days * day
        fit_end = val_start - gap_days * day
        folds.append(Fold(fit_end - fit_days * day, fit_end, val_start, val_end))
    return folds


def history_start(folds: Sequence[Fold]) -> pd.Timestamp:
    """The first instant any fold reads."""
    return min(f.fit_start for f in folds)


@dataclass(frozen=True, slots=True)
class FoldData:
    """A fold's fitting rows and validation rows (known compromised cards removed)."""

    fold: Fold
    fit: Dataset
    val: Dataset
    n_removed: int

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.fold.to_dict(),
            "fit_rows": len(self.fit),
            "fit_frauds": int(self.fit.y.sum()),
            "validation_rows": len(self.val),
            "validation_frauds": int(self.val.y.sum()),
            "removed_known_compromised": self.n_removed,
        }


def fold_data(
    history: Dataset,
    folds: Sequence[Fold],
    transactions: pd.DataFrame,
    delay_days: int = 7,
    known_days: int | None = None,
) -> list[FoldData]:
    """Slice each fold out of ``history`` and drop its validation rows of known compromised cards.

    Args:
        history: features and labels covering every fold's days.
        folds: see :func:`validation_folds`.
        transactions: ``customer_id``, ``tx_datetime``, ``is_fraud`` of at least the folds' days.
        delay_days: label delay of the known-compromised rule.
        known_days: the cards known compromised are those with a fraud in the last
            ``known_days`` of each fold's fit window (or later, after the delay), as the test
            window's are from the protocol's training window; None: the whole fit window.
            Set, the validation rows do not depend on how long the fit windows are, so folds
            of different fit lengths are scored on the same rows (:func:`search_history`).

    Raises:
        ValidationSplitError: if a fold's fit rows lack a class or its validation rows a fraud.
    """
    out = []
    for fold in folds:
        fit = history.slice_time(fold.fit_start, fold.fit_end)
        val = history.slice_time(fold.val_start, fold.val_end)
        frame = val.ids.assign(is_fraud=val.y.to_numpy())
        known_from = (
            fold.fit_start
            if known_days is None
            else max(fold.fit_start, fold.fit_end - pd.Timedelta(days=known_days))
        )
        known = known_compromised_mask(frame, transactions, known_from, fold.fit_end, delay_days)
        kept = val.subset(~known)
        if len(fit) == 0 or fit.y.nunique() < 2:
            raise ValidationSplitError(f"fold {fold.to_dict()}: fit rows need both classes")
        if int(kept.y.sum()) == 0:
            raise ValidationSplitError(f"fold {fold.to_dict()}: no fraud to validate on")
        out.append(FoldData(fold, fit, kept, int(known.sum())))
    return out


@dataclass(frozen=True, slots=True)
class Trial:
    """One candidate: its searched parameters, mean validation AP, per-fold APs, rounds."""

    params: dict[str, Any]
    validation_ap: float
    best_iteration: int
    seconds: float
    fold_aps: tuple[float, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "params": dict(self.params),
            "validation_ap": self.validation_ap,
            "fold_aps": list(self.fold_aps),
            "best_iteration": self.best_iteration,
            "seconds": round(self.seconds, 3),
        }


@dataclass(frozen=True, slots=True)
class SearchResult:
    """All trials in the order run, the best one, and the folds they were scored on."""

    trials: list[Trial]
    best: Trial
    folds: list[dict[str, Any]] = field(default_factory=list)

    def monotone_cost(self) -> float | None:
        """Best unconstrained mean validation AP minus best constrained one (None if one lacks)."""
        on = [t.validation_ap for t in self.trials if t.params.get("monotone")]
        off = [t.validation_ap for t in self.trials if not t.params.get("monotone")]
        return max(off) - max(on) if on and off else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "trials": [t.to_dict() for t in self.trials],
            "best": self.best.to_dict(),
            "folds": list(self.folds),
            "monotone_cost": self.monotone_cost(),
        }


def candidates(
    n_trials: int,
    base: Mapping[str, Any],
    space: Mapping[str, Sequence[Any]] = SEARCH_SPACE,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """The configurations to try, each with every ``space`` key.

    First ``base``'s values (``monotone`` off when ``base`` has none), then the same with the
    ``monotone`` choice flipped (if searched), then distinct seeded draws from the full grid.

    Args:
        n_trials: how many configurations in total (at least 1).
        base: the default parameters; its values of the ``space`` keys are the first candidate.
        space: values per searched parameter.
        seed: random state of the draws.
    """
    if n_trials < 1:
        raise ValueError(f"n_trials must be >= 1, got {n_trials}")
    keys = list(space)
    first = {k: base.get(k, False if k == "monotone" else space[k][0]) for k in keys}
    chosen = [first]
    if "monotone" in space and n_trials > 1:
        chosen.append({**first, "monotone": not first["monotone"]})
    grid = [dict(zip(keys, values, strict=True)) for values in itertools.product(*space.values())]
    rest = [g for g in grid if g not in chosen]
    rng = np.random.default_rng(seed)
    picks = rng.permutation(len(rest))[: max(0, n_trials - len(chosen))]
    return [*chosen, *(rest[i] for i in sorted(picks))][:n_trials]


def ap_curve(
    params: Mapping[str, Any],
    fit: Dataset,
    val: Dataset,
    max_rounds: int,
    patience: int,
) -> tuple[lgb.Booster, np.ndarray]:
    """Boost with early stopping on ``val``'s AP; the validation AP after each round run."""
    features = list(fit.X.columns)
    # feature_pre_filter off: min_child_samples varies across candidates on the same data.
    ds_params = {"feature_pre_filter": False, "verbose": -1}
    if "max_bin" in params:
        ds_params["max_bin"] = params["max_bin"]
    dtrain = lgb.Dataset(fit.X, fit.y, feature_name=features, params=ds_params, free_raw_data=False)
    dval = lgb.Dataset(val.X, val.y, reference=dtrain, params=ds_params, free_raw_data=False)
    record: dict[str, Any] = {}
    booster = lgb.train(
        {**lightgbm_params(params, features), "metric": VALIDATION_METRIC},
        dtrain,
        num_boost_round=max_rounds,
        valid_sets=[dval],
        valid_names=["validation"],
        callbacks=[
            lgb.early_stopping(patience, verbose=False),
            lgb.record_evaluation(record),
        ],
    )
    return booster, np.asarray(record["validation"][VALIDATION_METRIC], dtype=np.float64)


def early_stopped(
    params: Mapping[str, Any],
    fit_part: Dataset,
    val_part: Dataset,
    max_rounds: int,
    patience: int,
) -> tuple[lgb.Booster, int, float]:
    """Fit with early stopping on the validation part's AP.

    Returns:
        The booster, its best round (>= 1) and the validation AP at that round.
    """
    booster, curve = ap_curve(params, fit_part, val_part, max_rounds, patience)
    best = int(curve.argmax()) + 1
    return booster, best, float(curve[best - 1])


def cross_validate(
    params: Mapping[str, Any],
    folds: Sequence[FoldData],
    max_rounds: int = MAX_ROUNDS,
    patience: int = SEARCH_PATIENCE,
) -> tuple[int, float, tuple[float, ...]]:
    """One configuration on every fold: the round that maximises the mean AP curve.

    The curves are compared over the rounds every fold ran (each ran at least ``patience``
    rounds past its own best, or to ``max_rounds``).

    Returns:
        That round (>= 1), the mean validation AP there, and each fold's AP there.
    """
    if not folds:
        raise ValueError("no folds")
    curves = [ap_curve(params, f.fit, f.val, max_rounds, patience)[1] for f in folds]
    common = min(len(c) for c in curves)
    mean = np.mean([c[:common] for c in curves], axis=0)
    best = int(mean.argmax()) + 1  # argmax keeps the earliest of equal rounds
    return best, float(mean[best - 1]), tuple(float(c[best - 1]) for c in curves)


def search(
    folds: Sequence[FoldData],
    base_params: Mapping[str, Any],
    n_trials: int = DEFAULT_TRIALS,
    max_rounds: int = MAX_ROUNDS,
    patience: int = SEARCH_PATIENCE,
    space: Mapping[str, Sequence[Any]] = SEARCH_SPACE,
    seed: int = 0,
    base_scored: HistoryTrial | None = None,
) -> SearchResult:
    """Score every :func:`candidates` configuration by :func:`cross_validate`; best mean AP wins.

    Ties on the mean validation AP keep the earlier candidate (the defaults first).
    ``base_scored``: ``base_params`` already cross-validated on these ``folds`` (the chosen
    length of :func:`search_history`); a candidate that is exactly ``base_params`` takes its
    score instead of boosting the same folds again.
    """
    trials: list[Trial] = []
    for cand in candidates(n_trials, base_params, space, seed):
        params = {**base_params, **cand}
        if base_scored is not None and params == dict(base_params):
            trial = Trial(
                cand,
                base_scored.validation_ap,
                base_scored.best_iteration,
                base_scored.seconds,
                base_scored.fold_aps,
            )
            trials.append(trial)
            logger.info("trial %s: the history search's score on these folds", cand)
            continue
        t0 = time.perf_counter()
        rounds, ap, per_fold = cross_validate(params, folds, max_rounds, patience)
        trial = Trial(cand, ap, rounds, time.perf_counter() - t0, per_fold)
        logger.info(
            "trial %s: mean validation AP %.4f (folds %s) at round %d (%.1f s)",
            cand,
            ap,
            ", ".join(f"{a:.4f}" for a in per_fold),
            rounds,
            trial.seconds,
        )
        trials.append(trial)
    best_trial = max(trials, key=lambda t: t.validation_ap)  # max keeps the first of ties
    return SearchResult(trials=trials, best=best_trial, folds=[f.to_dict() for f in folds])


@dataclass(frozen=True, slots=True)
class HistoryTrial:
    """One length of fitting history: the defaults on every fold fitted on that many days."""

    days: int
    validation_ap: float
    best_iteration: int
    fold_aps: tuple[float, ...]
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "days": self.days,
            "validation_ap": self.validation_ap,
            "best_iteration": self.best_iteration,
            "fold_aps": list(self.fold_aps),
            "seconds": round(self.seconds, 3),
        }


@dataclass(frozen=True, slots=True)
class HistoryChoice:
    """The fitting history the folds chose, every length tried, and the chosen one's folds."""

    days: int
    trials: tuple[HistoryTrial, ...]
    folds: list[FoldData]

    @property
    def scored(self) -> HistoryTrial | None:
        """The chosen length's trial (None when a single length was not cross-validated)."""
        return next((t for t in self.trials if t.days == self.days), None)

    def to_dict(self) -> dict[str, Any]:
        return {"days": self.days, "trials": [t.to_dict() for t in self.trials]}


def feasible_history(
    choices: Sequence[int],
    train_days: int,
    train_end: pd.Timestamp,
    first_day: pd.Timestamp,
    n_folds: int = DEFAULT_FOLDS,
    gap_days: int = 7,
    val_days: int = 7,
) -> tuple[int, ...]:
    """The lengths of fitting history to try, ascending: ``train_days`` always, and each longer
    choice whose folds start on or after ``first_day`` (the data's first whole day)."""
    out = {train_days}
    for days in choices:
        if days > train_days:
            folds = validation_folds(train_end, n_folds, days, gap_days, val_days)
            if history_start(folds) >= first_day:
                out.add(days)
    return tuple(sorted(out))


def search_history(
    history: Dataset,
    train_end: pd.Timestamp,
    choices: Sequence[int],
    train_days: int,
    transactions: pd.DataFrame,
    base_params: Mapping[str, Any],
    n_folds: int = DEFAULT_FOLDS,
    delay_days: int = 7,
    val_days: int = 7,
    max_rounds: int = MAX_ROUNDS,
    patience: int = SEARCH_PATIENCE,
) -> HistoryChoice:
    """Choose how many days before ``train_end`` the model is fitted on, on the folds.

    For each length (ascending) the folds fit on that many days before their gap; their
    validation rows are the same for every length (the known compromised cards come from the
    last ``train_days`` of each fit window, as the test window's come from the training
    window: :func:`fold_data`'s ``known_days``). The ``base_params`` are cross-validated on
    each; the best mean validation AP wins, ties keep the shorter history. A single length
    is returned without boosting.

    Raises:
        ValueError: for no choices or a choice below 1.
        ValidationSplitError: as :func:`fold_data`.
    """
    lengths = sorted(set(choices))
    if not lengths or lengths[0] < 1:
        raise ValueError(f"history lengths must be >= 1 day, got {list(choices)}")
    trials: list[HistoryTrial] = []
    best: tuple[HistoryTrial, list[FoldData]] | None = None
    for days in lengths:
        folds = validation_folds(train_end, n_folds, days, delay_days, val_days)
        data = fold_data(history, folds, transactions, delay_days, known_days=train_days)
        if len(lengths) == 1:
            return HistoryChoice(days, (), data)
        t0 = time.perf_counter()
        rounds, ap, per_fold = cross_validate(base_params, data, max_rounds, patience)
        trial = HistoryTrial(days, ap, rounds, per_fold, time.perf_counter() - t0)
        logger.info(
            "history %d days: mean validation AP %.4f (folds %s) at round %d (%.1f s)",
            days,
            ap,
            ", ".join(f"{a:.4f}" for a in per_fold),
            rounds,
            trial.seconds,
        )
        trials.append(trial)
        if best is None or ap > best[0].validation_ap:
            best = (trial, data)
    assert best is not None
    return HistoryChoice(best[0].days, tuple(trials), best[1])


def split_validation(train: Dataset, validation_days: int) -> tuple[Dataset, Dataset]:
    """A window's earlier days (fit) and its last ``validation_days`` (validation).

    For a single configuration's early stopping (:func:`training.train.fit`).

    Raises:
        ValidationSplitError: if either part is empty or the validation days hold no fraud.
    """
    if validation_days < 1:
        raise ValidationSplitError(f"validation_days must be >= 1, got {validation_days}")
    cut = train.end - pd.Timedelta(days=validation_days)
    fit_part, val_part = train.slice_time(train.start, cut), train.slice_time(cut, train.end)
    if len(fit_part) == 0 or len(val_part) == 0:
        raise ValidationSplitError(
            f"{len(fit_part)} rows before and {len(val_part)} rows after {cut}"
        )
    if fit_part.y.nunique() < 2 or int(val_part.y.sum()) == 0:
        raise ValidationSplitError("both parts need frauds (the validation AP is undefined)")
    return fit_part, val_part

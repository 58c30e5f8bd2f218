"""LightGBM hyper-parameter search on time-based validation only.

The last ``validation_days`` of the *training* window are carved out as validation days: each
candidate is fitted on the earlier training days with early stopping on the validation days'
average precision, and the candidate with the best validation AP wins. The test window is never
seen here. The winner is then refitted on the whole training window with the number of rounds
early stopping chose (:func:`training.train.fit` does that part).

The search is a small one on purpose (a handful of fits of a few seconds each): the default
configuration first, then ``n_trials - 1`` distinct draws from :data:`SEARCH_SPACE` with a fixed
seed, so a run is reproducible.
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

from stages.shared.schemas import MODEL_FEATURES
from training.dataset import Dataset

logger = logging.getLogger(__name__)

SEARCH_SPACE: dict[str, tuple[Any, ...]] = {
    "num_leaves": (7, 15, 31, 63),
    "learning_rate": (0.05, 0.1),
    "min_child_samples": (20, 50, 100, 200),
    "feature_fraction": (0.6, 0.8, 1.0),
    # How strictly the monotone constraints on terminal risk are enforced: "basic" costs
    # the most accuracy, "advanced" the least (and is slower).
    "monotone_constraints_method": ("basic", "intermediate", "advanced"),
}
DEFAULT_TRIALS = 6
# Early-stopping patience while searching (the refit uses the round each trial found).
SEARCH_PATIENCE = 50
VALIDATION_METRIC = "average_precision"


class ValidationSplitError(ValueError):
    """The training window cannot be split into fit and validation days."""

    def __init__(self, detail: str) -> None:
        super().__init__(f"time-based validation split: {detail}")
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Trial:
    """One candidate: its parameters (search-space keys only), validation AP, best round."""

    params: dict[str, Any]
    validation_ap: float
    best_iteration: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "params": dict(self.params),
            "validation_ap": self.validation_ap,
            "best_iteration": self.best_iteration,
            "seconds": round(self.seconds, 3),
        }


@dataclass(frozen=True, slots=True)
class SearchResult:
    """All trials in the order run, and the best one."""

    trials: list[Trial]
    best: Trial
    fit_rows: int = 0
    validation_rows: int = 0
    validation_frauds: int = 0
    validation_start: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def candidates(
    n_trials: int,
    base: Mapping[str, Any],
    space: Mapping[str, Sequence[Any]] = SEARCH_SPACE,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """The configurations to try: ``base``'s values of the searched keys, then random draws.

    Draws are without replacement from the full grid, so no configuration is fitted twice.

    Args:
        n_trials: how many configurations in total (at least 1).
        base: the default parameters; its values of the ``space`` keys are the first candidate.
        space: values per searched parameter.
        seed: random state of the draws.
    """
    if n_trials < 1:
        raise ValueError(f"n_trials must be >= 1, got {n_trials}")
    keys = list(space)
    first = {k: base[k] for k in keys if k in base}
    grid = [dict(zip(keys, values, strict=True)) for values in itertools.product(*space.values())]
    rest = [g for g in grid if g != first]
    rng = np.random.default_rng(seed)
    picks = rng.permutation(len(rest))[: max(0, n_trials - 1)]
    return [first, *(rest[i] for i in sorted(picks))]


def split_validation(train: Dataset, validation_days: int) -> tuple[Dataset, Dataset]:
    """The training window's earlier days (fit) and its last ``validation_days`` (validation).

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
    features = list(MODEL_FEATURES)
    # feature_pre_filter off: min_child_samples varies across candidates on the same data.
    ds_params = {"feature_pre_filter": False, "verbose": -1}
    dtrain = lgb.Dataset(
        fit_part.X, fit_part.y, feature_name=features, params=ds_params, free_raw_data=False
    )
    dval = lgb.Dataset(
        val_part.X, val_part.y, reference=dtrain, params=ds_params, free_raw_data=False
    )
    booster = lgb.train(
        {**params, "metric": VALIDATION_METRIC},
        dtrain,
        num_boost_round=max_rounds,
        valid_sets=[dval],
        valid_names=["validation"],
        callbacks=[lgb.early_stopping(patience, verbose=False)],
    )
    best = max(1, booster.best_iteration)
    ap = float(booster.best_score["validation"][VALIDATION_METRIC])
    return booster, best, ap


def search(
    train: Dataset,
    base_params: Mapping[str, Any],
    validation_days: int = 2,
    n_trials: int = DEFAULT_TRIALS,
    max_rounds: int = 2000,
    patience: int = 100,
    space: Mapping[str, Sequence[Any]] = SEARCH_SPACE,
    seed: int = 0,
) -> SearchResult:
    """Try :func:`candidates` on a time-based split of ``train``; best validation AP wins.

    Ties on validation AP keep the earlier candidate (the default configuration first).

    Raises:
        ValidationSplitError: see :func:`split_validation`.
    """
    fit_part, val_part = split_validation(train, validation_days)
    trials: list[Trial] = []
    for cand in candidates(n_trials, base_params, space, seed):
        t0 = time.perf_counter()
        _, best, ap = early_stopped(
            {**base_params, **cand}, fit_part, val_part, max_rounds, patience
        )
        trial = Trial(cand, ap, best, time.perf_counter() - t0)
        logger.info(
            "trial %s: validation AP %.4f at round %d (%.1f s)", cand, ap, best, trial.seconds
        )
        trials.append(trial)
    best_trial = max(trials, key=lambda t: t.validation_ap)  # max keeps the first of ties
    return SearchResult(
        trials=trials,
        best=best_trial,
        fit_rows=len(fit_part),
        validation_rows=len(val_part),
        validation_frauds=int(val_part.y.sum()),
        validation_start=str(val_part.start.date()),
    )

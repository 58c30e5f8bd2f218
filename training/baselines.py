"""Baseline models trained on the same rows and features as LightGBM, for the side-by-side report.

Each baseline is a plain scikit-learn estimator with fixed, mostly default settings: they are
there to show what the tuned LightGBM adds, so none of them is tuned (and none ever sees the test
window). All take the ``MODEL_FEATURES`` matrix as is; the training frames have no missing
values (``training.dataset`` refuses rows without stored features).

* ``logistic_regression``: standardisation then L2-regularised logistic regression.
* ``random_forest``: 100 trees; leaves of at least 5 rows so that the forest's scores are
  proportions over several rows rather than mostly 0/1 (which would tie most test rows).
* ``gradient_boosting``: ``HistGradientBoostingClassifier`` with its defaults (its automatic
  early stopping holds out a random 10 % of the training rows, as a default user would get).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import pandas as pd
from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

logger = logging.getLogger(__name__)

BaselineName = Literal["logistic_regression", "random_forest", "gradient_boosting"]
BASELINES: tuple[BaselineName, ...] = (
    "logistic_regression",
    "random_forest",
    "gradient_boosting",
)


class Classifier(Protocol):
    """What a baseline needs from an estimator (scikit-learn's binary classifier API)."""

    def fit(self, X: np.ndarray, y: np.ndarray) -> Classifier: ...

    def predict_proba(self, X: np.ndarray) -> np.ndarray: ...


def make_baseline(name: BaselineName, seed: int = 0, n_jobs: int = 2) -> Classifier:
    """A fresh, unfitted baseline estimator.

    Args:
        name: one of :data:`BASELINES`.
        seed: random state of the stochastic ones.
        n_jobs: threads for the random forest.

    Raises:
        ValueError: for an unknown name.
    """
    if name == "logistic_regression":
        return make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    if name == "random_forest":
        return RandomForestClassifier(
            n_estimators=100, min_samples_leaf=5, n_jobs=n_jobs, random_state=seed
        )
    if name == "gradient_boosting":
        return HistGradientBoostingClassifier(random_state=seed)
    raise ValueError(f"unknown baseline {name!r}; choose from {BASELINES}")


@dataclass(frozen=True, slots=True)
class FittedBaseline:
    """A fitted baseline and how long fitting took."""

    name: str
    model: Classifier
    fit_seconds: float

    def predict(self, X: pd.DataFrame | np.ndarray) -> np.ndarray:
        """Fraud probability per row (float64)."""
        proba = self.model.predict_proba(np.asarray(X, dtype=np.float64))
        return np.asarray(proba[:, 1], dtype=np.float64)


def fit_baselines(
    X: pd.DataFrame | np.ndarray,
    y: pd.Series | np.ndarray,
    names: Sequence[BaselineName] = BASELINES,
    seed: int = 0,
    n_jobs: int = 2,
    factory: Callable[[BaselineName, int, int], Classifier] = make_baseline,
) -> list[FittedBaseline]:
    """Fit each baseline on the same training rows.

    Args:
        X: training features, ``MODEL_FEATURES`` columns.
        y: labels (0/1).
        names: which baselines, in report order.
        seed: random state.
        n_jobs: threads for the estimators that use them.
        factory: builds an unfitted estimator (tests pass a cheap one).

    Raises:
        ValueError: if the labels hold a single class (no baseline can be fitted).
    """
    Xa = np.asarray(X, dtype=np.float64)
    ya = np.asarray(y).astype(np.int64)
    if np.unique(ya).size < 2:
        raise ValueError("baselines need both classes in the training labels")
    out = []
    for name in names:
        t0 = time.perf_counter()
        model = factory(name, seed, n_jobs).fit(Xa, ya)
        seconds = time.perf_counter() - t0
        logger.info("fitted baseline %s in %.1f s", name, seconds)
        out.append(FittedBaseline(name=name, model=model, fit_seconds=seconds))
    return out

"""Training reference distributions for drift checks (PSI), stored with each model version.

Format (one per score and per model feature), the same as the ``training_distribution``
summaries written by ``training/train.py``::

    {"histogram": {"edges": [e1, ..., em], "fractions": [f0, ..., fm]}, "quantiles": {...},
     "mean": ..., "std": ..., "null_fraction": ...}

``edges`` are the *inner* cut points (unique training deciles); the outer bins are open, so a
value ``x`` falls in bin ``i`` = number of edges ``<= x`` (``numpy.searchsorted(edges, x,
side="right")``) and ``fractions`` has ``len(edges) + 1`` entries summing to 1. Non-finite
values are left out of the histogram and counted in ``null_fraction``.

Registry metadata keys read by :func:`reference_from_card` (the model card's fields) and
:func:`reference_from_metadata` (the raw dict), first found wins:

* ``metadata["reference"] = {"score": {...}, "features": {name: {...}}}`` (this module's
  :func:`build_reference`, written by ``train.py`` and by models registered outside it);
* ``metadata["training_distribution"]``, same shape (early versions of ``train.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from training.card import ModelCard

QUANTILES = (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0)
HISTOGRAM_BINS = 10
# Empty bins get this fraction in PSI, so a bin seen on one side only adds a large but finite
# term instead of an infinite one.
PSI_EPSILON = 1e-4
METADATA_KEYS = ("reference", "training_distribution")


@dataclass(frozen=True, slots=True)
class Histogram:
    """Inner bin edges and the training fraction per bin (``len(edges) + 1`` bins)."""

    edges: np.ndarray
    fractions: np.ndarray

    def __post_init__(self) -> None:
        if self.fractions.size != self.edges.size + 1:
            raise ValueError(
                f"histogram needs len(edges) + 1 fractions: {self.edges.size} edges, "
                f"{self.fractions.size} fractions"
            )


@dataclass(frozen=True, slots=True)
class Reference:
    """The training distributions of one model version."""

    score: Histogram | None
    features: dict[str, Histogram]


def distribution(values: np.ndarray | pd.Series, bins: int = HISTOGRAM_BINS) -> dict[str, Any]:
    """JSON-ready summary of one training distribution (format in the module docstring)."""
    v = np.asarray(values, dtype=np.float64)
    finite = v[np.isfinite(v)]
    if finite.size == 0:
        return {"quantiles": {}, "histogram": {"edges": [], "fractions": []}, "null_fraction": 1.0}
    q = np.quantile(finite, QUANTILES)
    edges = np.unique(np.quantile(finite, np.linspace(0, 1, bins + 1))[1:-1])
    counts = np.bincount(np.searchsorted(edges, finite, side="right"), minlength=edges.size + 1)
    return {
        "quantiles": {f"{p:g}": float(x) for p, x in zip(QUANTILES, q, strict=True)},
        "histogram": {"edges": edges.tolist(), "fractions": (counts / finite.size).tolist()},
        "mean": float(finite.mean()),
        "std": float(finite.std()),
        "null_fraction": float(1 - finite.size / v.size),
    }


def build_reference(
    features: pd.DataFrame, scores: np.ndarray, names: Sequence[str] | None = None
) -> dict[str, Any]:
    """The ``metadata["reference"]`` value for a model, from its training rows.

    Args:
        features: training feature matrix, one column per model feature.
        scores: the model's scores on those rows.
        names: feature columns to summarise (default: every column).
    """
    cols = list(names) if names is not None else list(features.columns)
    return {
        "score": distribution(scores),
        "features": {n: distribution(features[n].to_numpy(np.float64)) for n in cols},
    }


def _histogram(summary: Any) -> Histogram | None:
    if not isinstance(summary, Mapping):
        return None
    hist = summary.get("histogram")
    if not isinstance(hist, Mapping):
        return None
    edges = np.asarray(hist.get("edges") or [], dtype=np.float64)
    fractions = np.asarray(hist.get("fractions") or [], dtype=np.float64)
    if fractions.size == 0 or fractions.size != edges.size + 1:
        return None
    return Histogram(edges, fractions)


def _reference(ref: Mapping[str, Any]) -> Reference:
    feats = ref.get("features") if isinstance(ref.get("features"), Mapping) else {}
    assert isinstance(feats, Mapping)
    hists = {str(n): h for n, s in feats.items() if (h := _histogram(s)) is not None}
    return Reference(score=_histogram(ref.get("score")), features=hists)


def reference_from_metadata(metadata: Mapping[str, Any]) -> Reference | None:
    """The reference stored in a registry version's raw metadata, or None if it has none."""
    for key in METADATA_KEYS:
        ref = metadata.get(key)
        if isinstance(ref, Mapping):
            return _reference(ref)
    return None


def reference_from_card(card: ModelCard) -> Reference | None:
    """The reference stored with a registry version, or None if it has none."""
    for ref in (card.reference, card.training_distribution):
        if ref is not None:
            return _reference(ref)
    return None


def bin_fractions(values: np.ndarray, edges: np.ndarray) -> tuple[np.ndarray, int]:
    """Fractions of the finite ``values`` per bin of ``edges``, and how many were finite."""
    v = np.asarray(values, dtype=np.float64)
    finite = v[np.isfinite(v)]
    counts = np.bincount(np.searchsorted(edges, finite, side="right"), minlength=edges.size + 1)
    n = int(finite.size)
    return (counts / n if n else counts.astype(np.float64)), n


def psi(expected: np.ndarray, actual: np.ndarray, epsilon: float = PSI_EPSILON) -> float:
    """Population stability index ``sum((a - e) * ln(a / e))`` over bins.

    Fractions below ``epsilon`` are raised to it (on both sides) before the sum.
    """
    e = np.maximum(np.asarray(expected, dtype=np.float64), epsilon)
    a = np.maximum(np.asarray(actual, dtype=np.float64), epsilon)
    if e.shape != a.shape:
        raise ValueError(f"PSI of {e.shape} vs {a.shape} bins")
    return float(np.sum((a - e) * np.log(a / e)))


def psi_against(hist: Histogram, values: np.ndarray) -> float:
    """PSI of live ``values`` against a training histogram; NaN without finite values."""
    fractions, n = bin_fractions(values, hist.edges)
    if n == 0:
        return float("nan")
    return psi(hist.fractions, fractions)

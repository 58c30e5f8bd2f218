"""How good the served models are on the labelled window: champion vs shadow on the same
events, and the rolling online metrics (ROC AUC, average precision, precision/recall at the
routing thresholds, calibration).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from stages.evaluation.join import LabelledWindow
from stages.shared.settings import RoutingSettings
from training.evaluate import average_precision, roc_auc

CALIBRATION_BINS = 10


# --- champion vs shadow on the same labelled events ------------------------------------------
@dataclass(frozen=True, slots=True)
class ShadowComparison:
    """The champion's and a shadow's metrics on the same labelled events: those the champion
    served and the shadow scored beside it (paired, so window drift cannot favour either)."""

    champion: str
    shadow: str
    n: int
    n_frauds: int
    champion_average_precision: float
    shadow_average_precision: float
    champion_roc_auc: float
    shadow_roc_auc: float
    first_event_ms: int
    last_event_ms: int

    def to_dict(self) -> dict[str, Any]:
        return {k: finite(v) if isinstance(v, float) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ShadowComparison:
        def num(k: str) -> float:
            v = d.get(k)
            return float(v) if isinstance(v, int | float) else math.nan

        return cls(
            champion=str(d["champion"]),
            shadow=str(d["shadow"]),
            n=int(d["n"]),
            n_frauds=int(d["n_frauds"]),
            champion_average_precision=num("champion_average_precision"),
            shadow_average_precision=num("shadow_average_precision"),
            champion_roc_auc=num("champion_roc_auc"),
            shadow_roc_auc=num("shadow_roc_auc"),
            first_event_ms=int(d["first_event_ms"]),
            last_event_ms=int(d["last_event_ms"]),
        )


def shadow_comparisons(window: LabelledWindow) -> list[ShadowComparison]:
    """One comparison per (champion version, shadow version) pair found in the window."""
    if window.shadow_version is None or window.shadow_score is None or not len(window):
        return []
    has = window.shadow_version.astype(str) != ""
    if not has.any():
        return []
    pairs = np.char.add(
        np.char.add(window.model_version.astype(str), "|"), window.shadow_version.astype(str)
    )
    out = []
    for pair in sorted(set(pairs[has].tolist())):
        rows = has & (pairs == pair)
        champion, shadow = pair.split("|", 1)
        y = window.is_fraud[rows]
        both = y.size > 0 and 0 < int(y.sum()) < y.size
        cs, ss = window.score[rows], window.shadow_score[rows]
        out.append(
            ShadowComparison(
                champion=champion,
                shadow=shadow,
                n=int(y.size),
                n_frauds=int(y.sum()),
                champion_average_precision=average_precision(y, cs) if both else math.nan,
                shadow_average_precision=average_precision(y, ss) if both else math.nan,
                champion_roc_auc=roc_auc(y, cs) if both else math.nan,
                shadow_roc_auc=roc_auc(y, ss) if both else math.nan,
                first_event_ms=int(window.event_ms[rows].min()),
                last_event_ms=int(window.event_ms[rows].max()),
            )
        )
    return out


# --- online metrics --------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class CalibrationBin:
    n: int
    mean_score: float
    fraud_rate: float


@dataclass(frozen=True, slots=True)
class OnlineMetrics:
    """Metrics of a window of labelled predictions; NaN where undefined."""

    n: int
    n_frauds: int
    roc_auc: float
    average_precision: float
    # Per routing threshold name ("action", "review"): precision, recall, flagged count.
    precision: dict[str, float]
    recall: dict[str, float]
    flagged: dict[str, int]
    calibration: list[CalibrationBin]
    ece: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def precision_recall_at(
    y: np.ndarray, score: np.ndarray, threshold: float
) -> tuple[float, float, int]:
    """Precision and recall of ``score >= threshold`` and how many rows it flags.

    Precision is NaN when nothing is flagged, recall when there is no fraud."""
    flagged = score >= threshold
    n_flagged = int(flagged.sum())
    tp = int((flagged & (y == 1)).sum())
    positives = int((y == 1).sum())
    precision = tp / n_flagged if n_flagged else math.nan
    recall = tp / positives if positives else math.nan
    return precision, recall, n_flagged


def calibration_bins(
    y: np.ndarray, score: np.ndarray, bins: int = CALIBRATION_BINS
) -> list[CalibrationBin]:
    """Mean score and fraud rate per score decile (equal-count bins by score rank; rows with
    equal scores are split in a stable order)."""
    if len(score) == 0:
        return []
    order = np.argsort(score, kind="stable")
    out = []
    for idx in np.array_split(order, min(bins, len(score))):
        out.append(
            CalibrationBin(
                n=int(idx.size),
                mean_score=float(score[idx].mean()),
                fraud_rate=float(y[idx].mean()),
            )
        )
    return out


def expected_calibration_error(cal: Sequence[CalibrationBin]) -> float:
    """ECE over the decile bins: ``sum(n_b / n * |mean_score_b - fraud_rate_b|)``.

    Equal-count bins rather than equal-width ones: fraud scores sit almost all below 0.1, so
    equal-width bins would put nearly every row in the first bin and hide miscalibration."""
    total = sum(b.n for b in cal)
    if not total:
        return math.nan
    return float(sum(b.n / total * abs(b.mean_score - b.fraud_rate) for b in cal))


def online_metrics(y: np.ndarray, score: np.ndarray, routing: RoutingSettings) -> OnlineMetrics:
    """Every rolling metric of one window of labelled predictions."""
    y = np.asarray(y, dtype=np.int64)
    score = np.asarray(score, dtype=np.float64)
    precision: dict[str, float] = {}
    recall: dict[str, float] = {}
    flagged: dict[str, int] = {}
    for name, t in (("action", routing.action_threshold), ("review", routing.review_threshold)):
        precision[name], recall[name], flagged[name] = precision_recall_at(y, score, t)
    cal = calibration_bins(y, score)
    return OnlineMetrics(
        n=len(y),
        n_frauds=int((y == 1).sum()),
        roc_auc=roc_auc(y, score) if len(y) else math.nan,
        average_precision=average_precision(y, score) if len(y) else math.nan,
        precision=precision,
        recall=recall,
        flagged=flagged,
        calibration=cal,
        ece=expected_calibration_error(cal),
    )


def finite(x: float) -> float | None:
    return x if isinstance(x, float) and math.isfinite(x) else None

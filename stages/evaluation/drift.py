"""Drift of the served inputs against the training reference (PSI), and the retraining
triggers that drift and the online metrics raise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from stages.evaluation.join import LabelledWindow, PredictionRow
from stages.evaluation.quality import OnlineMetrics, finite
from stages.shared.settings import EvaluationSettings
from training.reference import Reference, psi_against

Reason = Literal["score_psi", "feature_psi", "precision", "roc_auc"]


# --- drift -----------------------------------------------------------------------------------
class DriftWindow:
    """Ring buffer of the last ``size`` predictions: score and feature values.

    Scores of different model versions are not comparable: the score column is cleared when
    the model version changes (features are kept, they do not depend on the model)."""

    def __init__(self, size: int, feature_names: Sequence[str]) -> None:
        self.size = size
        self.feature_names = tuple(feature_names)
        self._col = {n: j for j, n in enumerate(self.feature_names)}
        self._scores = np.full(size, np.nan)
        self._features = np.full((size, len(self.feature_names)), np.nan)
        self._next = 0
        self._count = 0
        self.model_version: str | None = None

    def add(self, rows: Sequence[PredictionRow]) -> None:
        for r in rows:
            if r.model_version != self.model_version:
                if self.model_version is not None:
                    self._scores[:] = np.nan
                self.model_version = r.model_version
            i = self._next
            self._scores[i] = r.score
            feats = self._features[i]
            feats[:] = np.nan
            for name, v in r.features.items():
                j = self._col.get(name)
                if j is not None:
                    feats[j] = v
            self._next = (i + 1) % self.size
            self._count = min(self._count + 1, self.size)

    def __len__(self) -> int:
        return self._count

    def scores(self) -> np.ndarray:
        s = self._scores[: self._count] if self._count < self.size else self._scores
        return s[np.isfinite(s)]

    def feature(self, name: str) -> np.ndarray:
        col = self._features[:, self._col[name]]
        return col[: self._count] if self._count < self.size else col


@dataclass(frozen=True, slots=True)
class Drift:
    n: int
    score_psi: float
    feature_psi: dict[str, float]


def drift_psi(window: DriftWindow, reference: Reference) -> Drift:
    """PSI of the window's scores and features against the training reference (NaN where the
    reference or the live values are missing)."""
    score_psi = math.nan
    if reference.score is not None:
        s = window.scores()
        if s.size:
            score_psi = psi_against(reference.score, s)
    feats = {
        name: psi_against(hist, window.feature(name))
        for name, hist in reference.features.items()
        if name in window.feature_names
    }
    return Drift(n=len(window), score_psi=score_psi, feature_psi=feats)


# --- retraining triggers ---------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Trigger:
    reason: Reason
    value: float
    threshold: float
    detail: str = ""


def retrain_triggers(
    metrics: OnlineMetrics | None, drift: Drift | None, cfg: EvaluationSettings
) -> list[Trigger]:
    """Thresholds crossed, most severe kind first (score drift, feature drift, precision,
    AUC). Metrics on too few rows never trigger."""
    out: list[Trigger] = []
    if drift is not None and drift.n >= cfg.min_predictions:
        if drift.score_psi > cfg.psi_threshold:
            out.append(Trigger("score_psi", drift.score_psi, cfg.psi_threshold))
        worst = max(
            ((v, k) for k, v in drift.feature_psi.items() if math.isfinite(v)), default=None
        )
        if worst is not None and worst[0] > cfg.feature_psi_threshold:
            out.append(Trigger("feature_psi", worst[0], cfg.feature_psi_threshold, worst[1]))
    if metrics is not None and metrics.n >= cfg.min_labelled:
        p = metrics.precision["action"]
        if metrics.flagged["action"] >= cfg.min_flagged and p < cfg.precision_floor:
            out.append(Trigger("precision", p, cfg.precision_floor))
        if metrics.n_frauds > 0 and metrics.roc_auc < cfg.auc_floor:
            out.append(Trigger("roc_auc", metrics.roc_auc, cfg.auc_floor))
    return out


def retrain_request(
    triggers: Sequence[Trigger],
    metrics: OnlineMetrics | None,
    drift: Drift | None,
    window: LabelledWindow | None,
    model: str,
    model_version: str | None,
    now_ms: int,
) -> dict[str, Any]:
    """The ``model.retrain_requests`` event: why, the metric values, the model, the window."""
    versions: dict[str, int] = {}
    first = last = None
    if window is not None and len(window):
        vals, counts = np.unique(window.model_version.astype(str), return_counts=True)
        versions = {str(v): int(c) for v, c in zip(vals, counts, strict=True)}
        first, last = int(window.event_ms.min()), int(window.event_ms.max())
    return {
        "reason": triggers[0].reason,
        "triggers": [
            {"reason": t.reason, "value": t.value, "threshold": t.threshold, "detail": t.detail}
            for t in triggers
        ],
        "model": model,
        "model_version": model_version,
        "metrics": {
            "roc_auc": finite(metrics.roc_auc) if metrics else None,
            "average_precision": finite(metrics.average_precision) if metrics else None,
            "precision": {k: finite(v) for k, v in metrics.precision.items()} if metrics else {},
            "recall": {k: finite(v) for k, v in metrics.recall.items()} if metrics else {},
            "ece": finite(metrics.ece) if metrics else None,
            "score_psi": finite(drift.score_psi) if drift else None,
            "feature_psi": {k: finite(v) for k, v in drift.feature_psi.items()} if drift else {},
        },
        "window": {
            "labelled": metrics.n if metrics else 0,
            "frauds": metrics.n_frauds if metrics else 0,
            "predictions": drift.n if drift else 0,
            "first_event_ms": first,
            "last_event_ms": last,
            "model_versions": versions,
        },
        "requested_ms": now_ms,
    }

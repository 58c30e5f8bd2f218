"""Pure logic of the evaluation stage: the predictions it can evaluate, the join protocol (an
in-memory store with the same semantics as the Redis one), rolling online metrics,
calibration, drift (PSI) and the retraining triggers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

import numpy as np

from stages.shared.records import Label, parse_prediction
from stages.shared.schemas import InvalidMessage
from stages.shared.settings import EvaluationSettings, RoutingSettings
from training.evaluate import average_precision, roc_auc
from training.reference import Reference, psi_against

JoinKind = Literal["prediction", "label"]
# What happened to one offered record: it waits for its other half, it completed a pair
# (appended to the window), or its pair was already joined (a redelivery, ignored).
JoinOutcome = Literal["pending", "joined", "duplicate"]
Reason = Literal["score_psi", "feature_psi", "precision", "roc_auc"]

CALIBRATION_BINS = 10


# --- records ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class PredictionRow:
    """The parts of a prediction record the evaluation needs."""

    transaction_id: int
    score: float
    model_version: str
    event_ms: int
    features: dict[str, float]
    # The shadow model's score of the same event, when one was scored (logged, not routed).
    shadow_version: str = ""
    shadow_score: float = math.nan


def scored_prediction(raw: bytes | None) -> PredictionRow:
    """The evaluation's view of a ``predictions`` value (checked by
    :func:`stages.shared.records.parse_prediction`, as routing checks it).

    Raises:
        InvalidMessage: unreadable, or without a usable score (``no_score`` for the records
            the prediction stage writes when features were unavailable).
    """
    p = parse_prediction(raw)
    score = p.score
    if isinstance(score, bool) or not isinstance(score, int | float) or not math.isfinite(score):
        raise InvalidMessage("no_score", f"score={score!r}")
    obj = p.fields
    feats = obj.get("features")
    features: dict[str, float] = {}
    if isinstance(feats, dict):
        for name, v in feats.items():
            ok = isinstance(v, int | float) and not isinstance(v, bool)
            features[str(name)] = float(v) if ok else math.nan
    shadow = obj.get("shadow")
    shadow_version, shadow_score = "", math.nan
    if isinstance(shadow, dict):
        s = shadow.get("score")
        if isinstance(s, int | float) and not isinstance(s, bool) and math.isfinite(s):
            shadow_version, shadow_score = str(shadow.get("model_version") or ""), float(s)
    return PredictionRow(
        transaction_id=p.transaction_id,
        score=float(score),
        model_version=str(obj.get("model_version") or ""),
        event_ms=p.event_ms or 0,
        features=features,
        shadow_version=shadow_version,
        shadow_score=shadow_score,
    )


# --- the join --------------------------------------------------------------------------------
# A window entry is "<score>|<model_version>|<event_ms>|<is_fraud>": the prediction half
# then the label half, whichever arrived first. A prediction with a shadow score has two more
# fields in its half: "<score>|<version>|<event_ms>|<shadow_version>|<shadow_score>|<is_fraud>".
def prediction_half(p: PredictionRow) -> str:
    if p.shadow_version and math.isfinite(p.shadow_score):
        return f"{p.score!r}|{p.model_version}|{p.event_ms}|{p.shadow_version}|{p.shadow_score!r}"
    return f"{p.score!r}|{p.model_version}|{p.event_ms}"


def label_half(lab: Label) -> str:
    return str(lab.is_fraud)


@dataclass(frozen=True, slots=True)
class JoinItem:
    """One record offered to the join store."""

    kind: JoinKind
    transaction_id: int
    half: str  # prediction_half() or label_half()


class JoinStore(Protocol):
    """Where predictions wait for labels (and early labels for predictions).

    Semantics (the Redis store implements them in one Lua script per record):

    * a prediction whose label is waiting, or a label whose prediction is waiting, completes
      the pair: the entry is pushed at the head of the window (trimmed to ``window`` entries),
      the waiting half is deleted and the transaction is marked joined;
    * otherwise the record waits, a prediction for ``pending_ttl_s``, a label for
      ``orphan_label_ttl_s`` (labels of transactions never scored expire quickly);
    * a record of an already-joined transaction is a ``duplicate`` (redelivery) and ignored.
    """

    def offer(self, items: Sequence[JoinItem]) -> list[JoinOutcome]: ...

    def window(self) -> list[str]:
        """The joined entries, newest first."""
        ...

    def claim_retrain(self, cooldown_s: int, payload: str) -> bool:
        """True for the one caller allowed to request retraining in this cooldown."""
        ...

    def publish_comparisons(self, comparisons: Sequence[ShadowComparison]) -> None:
        """Store the latest champion-vs-shadow comparisons (read by the retrain job's gate)."""
        ...

    def comparisons(self) -> list[ShadowComparison]:
        """The comparisons last published."""
        ...


@dataclass
class MemoryJoinStore:
    """In-process :class:`JoinStore` (tests; a single process without Redis). Expiry uses the
    injected clock, wall-clock seconds by default."""

    cfg: EvaluationSettings
    clock: Callable[[], float] = time.monotonic
    _pred: dict[int, tuple[str, float]] = field(default_factory=dict)
    _label: dict[int, tuple[str, float]] = field(default_factory=dict)
    _done: dict[int, float] = field(default_factory=dict)
    _window: list[str] = field(default_factory=list)
    _cooldown_until: float = -math.inf
    _comparisons: dict[tuple[str, str], ShadowComparison] = field(default_factory=dict)

    def _live(self, store: dict[int, Any], tid: int, now: float) -> Any:
        hit = store.get(tid)
        if hit is None:
            return None
        expires = hit if isinstance(hit, float) else hit[1]
        if expires <= now:
            del store[tid]
            return None
        return hit

    def offer(self, items: Sequence[JoinItem]) -> list[JoinOutcome]:
        out: list[JoinOutcome] = []
        for it in items:
            now = float(self.clock())
            tid = it.transaction_id
            if self._live(self._done, tid, now) is not None:
                out.append("duplicate")
                continue
            mine, other = (
                (self._pred, self._label) if it.kind == "prediction" else (self._label, self._pred)
            )
            waiting = self._live(other, tid, now)
            if waiting is not None:
                pred, lab = (
                    (it.half, waiting[0]) if it.kind == "prediction" else (waiting[0], it.half)
                )
                self._window.insert(0, f"{pred}|{lab}")
                del self._window[self.cfg.window :]
                del other[tid]
                self._done[tid] = now + self.cfg.pending_ttl_s
                out.append("joined")
                continue
            ttl = self.cfg.pending_ttl_s if it.kind == "prediction" else self.cfg.orphan_label_ttl_s
            mine[tid] = (it.half, now + ttl)
            out.append("pending")
        return out

    def window(self) -> list[str]:
        return list(self._window)

    def claim_retrain(self, cooldown_s: int, payload: str) -> bool:
        now = float(self.clock())
        if now < self._cooldown_until:
            return False
        self._cooldown_until = now + cooldown_s
        return True

    def publish_comparisons(self, comparisons: Sequence[ShadowComparison]) -> None:
        self._comparisons = {(c.champion, c.shadow): c for c in comparisons}

    def comparisons(self) -> list[ShadowComparison]:
        return list(self._comparisons.values())


@dataclass(frozen=True, slots=True)
class LabelledWindow:
    """The rolling window as arrays (newest first)."""

    score: np.ndarray
    is_fraud: np.ndarray
    model_version: np.ndarray
    event_ms: np.ndarray
    # "" and NaN where no shadow scored the event.
    shadow_version: np.ndarray | None = None
    shadow_score: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.score)


def decode_window(entries: Sequence[str | bytes]) -> LabelledWindow:
    """Window entries -> arrays; malformed entries are skipped."""
    scores: list[float] = []
    ys: list[int] = []
    versions: list[str] = []
    events: list[int] = []
    shadow_versions: list[str] = []
    shadow_scores: list[float] = []
    for e in entries:
        text = e.decode() if isinstance(e, bytes) else e
        parts = text.split("|")
        if len(parts) not in (4, 6):
            continue
        try:
            s, v, ev, y = float(parts[0]), parts[1], int(parts[2]), int(parts[-1])
            sv, ss = (parts[3], float(parts[4])) if len(parts) == 6 else ("", math.nan)
        except ValueError:
            continue
        scores.append(s)
        versions.append(v)
        events.append(ev)
        ys.append(y)
        shadow_versions.append(sv)
        shadow_scores.append(ss)
    return LabelledWindow(
        score=np.asarray(scores, dtype=np.float64),
        is_fraud=np.asarray(ys, dtype=np.int64),
        model_version=np.asarray(versions, dtype=object),
        event_ms=np.asarray(events, dtype=np.int64),
        shadow_version=np.asarray(shadow_versions, dtype=object),
        shadow_score=np.asarray(shadow_scores, dtype=np.float64),
    )


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
        return {k: _finite(v) if isinstance(v, float) else v for k, v in asdict(self).items()}

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


def _finite(x: float) -> float | None:
    return x if isinstance(x, float) and math.isfinite(x) else None


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
            "roc_auc": _finite(metrics.roc_auc) if metrics else None,
            "average_precision": _finite(metrics.average_precision) if metrics else None,
            "precision": {k: _finite(v) for k, v in metrics.precision.items()} if metrics else {},
            "recall": {k: _finite(v) for k, v in metrics.recall.items()} if metrics else {},
            "ece": _finite(metrics.ece) if metrics else None,
            "score_psi": _finite(drift.score_psi) if drift else None,
            "feature_psi": {k: _finite(v) for k, v in drift.feature_psi.items()} if drift else {},
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

"""The evaluation stage's join of predictions with their delayed labels: the predictions it
can evaluate, the join protocol (an in-memory store with the same semantics as the Redis
one in ``app.py``) and the labelled window it fills.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np

from stages.shared.records import Label, parse_prediction
from stages.shared.schemas import InvalidMessage
from stages.shared.settings import EvaluationSettings

if TYPE_CHECKING:
    from stages.evaluation.quality import ShadowComparison

JoinKind = Literal["prediction", "label"]
# What happened to one offered record: it waits for its other half, it completed a pair
# (appended to the window), or its pair was already joined (a redelivery, ignored).
JoinOutcome = Literal["pending", "joined", "duplicate"]


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

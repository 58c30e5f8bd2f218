"""Pure logic of the retrain job: read a request, place the latest training window, decide the
gate.

**The gate.** The candidate is served as shadow: the prediction stage scores it on every batch
beside the champion, and the evaluation stage compares both on the *same* labelled events (the
ones the champion served and the candidate scored, :class:`ShadowComparison`). Once that sample
holds ``min_labelled`` events with at least ``min_frauds`` frauds, the gate is decided, once:
promote if the candidate's average precision is at least the champion's minus ``ap_tolerance``
(0 by default), reject otherwise. Why this rule:

* average precision, not ROC AUC: frauds are rare and the routing thresholds act on the top of
  the ranking, which AP weighs and AUC mostly does not (the offline protocol selects on AP too);
* paired events: both models see the same transactions and labels, so the drift that triggered
  the request (or a quiet period) cannot favour either;
* ``>=``: the candidate is trained on more recent data; at equal measured quality the fresher
  model is the better bet against the next drift;
* decided at a fixed sample size, not re-checked until it passes: checking after every new label
  and stopping at the first pass would promote a model that is no better more often than the
  rule says (optional stopping).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import orjson
import pandas as pd

from stages.evaluation.quality import ShadowComparison
from stages.shared.errors import RtpipeError
from stages.shared.schemas import InvalidMessage, json_object
from stages.shared.settings import RetrainSettings
from training import tune
from training.card import ModelCard

GateOutcome = Literal["wait", "promote", "reject", "timeout"]
DAY = pd.Timedelta(days=1)


class WindowError(RtpipeError, ValueError):
    """The data cannot hold the training window the settings ask for."""


@dataclass(frozen=True, slots=True)
class RetrainRequest:
    """What the job needs from a ``model.retrain_requests`` event."""

    request_id: str
    reason: str
    model: str
    # Labels are known for events before this (the newest labelled prediction's event time);
    # None: the data's end.
    labels_known_ms: int | None
    requested_ms: int | None


def parse_request(raw: bytes | None, request_id: str) -> RetrainRequest:
    """Decode a request (the evaluation stage's, or one sent by an operator).

    Raises:
        InvalidMessage: not a JSON object, or without a model name.
    """
    obj = json_object(raw)
    model = obj.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidMessage("missing_field", "model")
    window = obj.get("window") if isinstance(obj.get("window"), dict) else {}
    last = window.get("last_event_ms") if isinstance(window, dict) else None
    requested = obj.get("requested_ms")
    return RetrainRequest(
        request_id=request_id,
        reason=str(obj.get("reason") or "manual"),
        model=model,
        labels_known_ms=last if isinstance(last, int) and not isinstance(last, bool) else None,
        requested_ms=requested if isinstance(requested, int) else None,
    )


def request_payload(model: str, reason: str, labels_known_ms: int | None, now_ms: int) -> bytes:
    """A request in the evaluation stage's format (``rtpipe retrain --request``, tests)."""
    return orjson.dumps(
        {
            "reason": reason,
            "triggers": [],
            "model": model,
            "window": {"last_event_ms": labels_known_ms},
            "requested_ms": now_ms,
        }
    )


@dataclass(frozen=True, slots=True)
class TrainingWindow:
    train_start: pd.Timestamp
    train_end: pd.Timestamp  # exclusive
    test_start: pd.Timestamp
    test_end: pd.Timestamp  # exclusive
    n_folds: int

    def to_dict(self) -> dict[str, str | int]:
        return {
            "train": f"{self.train_start.date()}..{(self.train_end - DAY).date()}",
            "test": f"{self.test_start.date()}..{(self.test_end - DAY).date()}",
            "n_folds": self.n_folds,
        }


def latest_window(
    first_event: pd.Timestamp,
    last_event: pd.Timestamp,
    labels_known: pd.Timestamp | None,
    cfg: RetrainSettings,
) -> TrainingWindow:
    """The newest protocol windows whose labels are all known: the test window ends at the
    last whole day before ``labels_known`` (or the data's end), the training window
    ``delay_days`` earlier; as many validation folds (up to ``cfg.n_folds``) as fit in the
    data before.

    Raises:
        WindowError: if not even one fold fits.
    """
    if labels_known is None or labels_known > last_event:
        known = last_event
        test_end = last_event.floor("D") + DAY  # every label of the data is known
    else:
        known = labels_known
        test_end = labels_known.floor("D")  # whole days only
    test_start = test_end - cfg.test_days * DAY
    train_end = test_start - cfg.delay_days * DAY
    train_start = train_end - cfg.train_days * DAY
    first_day = first_event.ceil("D")
    n_folds = 0
    for n in range(cfg.n_folds, 0, -1):
        folds = tune.validation_folds(train_end, n, cfg.train_days, cfg.delay_days, cfg.test_days)
        if tune.history_start(folds) >= first_day:
            n_folds = n
            break
    if n_folds == 0:
        raise WindowError(
            f"data from {first_event} to {known} cannot hold a training window of "
            f"{cfg.train_days} days, a {cfg.delay_days}-day gap, a {cfg.test_days}-day test "
            "window and one validation fold before it"
        )
    return TrainingWindow(train_start, train_end, test_start, test_end, n_folds)


@dataclass(frozen=True, slots=True)
class GateDecision:
    outcome: GateOutcome
    detail: str


def gate(
    comparison: ShadowComparison | None, cfg: RetrainSettings, waited_s: float
) -> GateDecision:
    """Decide the gate for one candidate (rule in the module docstring)."""
    n = comparison.n if comparison else 0
    frauds = comparison.n_frauds if comparison else 0
    if comparison is None or n < cfg.min_labelled or frauds < cfg.min_frauds:
        sample = f"{n}/{cfg.min_labelled} labelled, {frauds}/{cfg.min_frauds} frauds"
        if waited_s >= cfg.gate_timeout_s:
            return GateDecision("timeout", f"gate undecided after {waited_s:.0f} s ({sample})")
        return GateDecision("wait", sample)
    cand, champ = comparison.shadow_average_precision, comparison.champion_average_precision
    text = (
        f"AP {cand:.4f} (candidate {comparison.shadow}) vs {champ:.4f} (champion "
        f"{comparison.champion}) on {comparison.n} labelled events, {comparison.n_frauds} frauds"
    )
    if math.isfinite(cand) and math.isfinite(champ) and cand >= champ - cfg.ap_tolerance:
        return GateDecision("promote", text)
    return GateDecision("reject", text)


def candidate_service(champion: ModelCard | None, default: str) -> str:
    """The feature service a candidate is trained on: its champion's (the gate compares the
    two on the same events, and a v2 champion must not be replaced by a v1 candidate),
    ``default`` when there is no champion or it records none."""
    if champion is not None and champion.feature_service:
        return champion.feature_service
    return default

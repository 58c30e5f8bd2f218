"""Pure window logic of the enrichment stage, on the per-entity state lists that the
quixstreams app keeps in its state store (with changelog topics).

Customer spending (SIMULATOR.md): for a transaction at ``t``, the number of the customer's
transactions in ``(t - n days, t]`` and their mean amount, the current one included.

Terminal risk: over the terminal's transactions in ``(t - (7+n) days, t - 7 days]``, their
number and fraud fraction. Every transaction gets a label (fraud or not) that is known
7 days later, so the window is computed from the ``labels`` stream alone: a label carries its
transaction's time, and the window's upper bound ``t - 7 days`` means that every label it
needs became known at or before ``t``. The pipeline serves these windows from the label index
(``stages/shared/labels.py``, counted per event by the prediction stage); ``TerminalState``
and :func:`terminal_features` here are the per-terminal stream formulation the index is
checked against (tests/cluster/test_label_index_cluster.py, tests/unit/test_stage_logic.py).
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass
from typing import Any

from stages.shared.schemas import (
    DAY_MS,
    LABEL_DELAY_DAYS,
    WINDOWS_DAYS,
    InvalidMessage,
)

_MAX_CUSTOMER_SPAN_MS = max(WINDOWS_DAYS) * DAY_MS
_MAX_TERMINAL_SPAN_MS = (LABEL_DELAY_DAYS + max(WINDOWS_DAYS)) * DAY_MS


class LateEvent(InvalidMessage):
    """An event older than the grace period allows: its windows can no longer be exact."""

    def __init__(self, event_ms: int, watermark_ms: int, grace_ms: int) -> None:
        super().__init__(
            "late_event",
            f"event time {event_ms} is {watermark_ms - event_ms} ms behind the newest event "
            f"{watermark_ms} (grace {grace_ms} ms)",
        )


@dataclass
class CustomerState:
    """Per-customer history: parallel lists sorted by event time, and the newest time seen."""

    ts: list[int]
    amount: list[float]
    max_ts: int

    @classmethod
    def from_state(cls, raw: Any) -> CustomerState:
        if not raw:
            return cls([], [], 0)
        return cls(list(raw["ts"]), list(raw["amount"]), int(raw["max_ts"]))

    def to_state(self) -> dict[str, Any]:
        return {"ts": self.ts, "amount": self.amount, "max_ts": self.max_ts}


def update_customer(
    state: CustomerState, event_ms: int, amount: float, grace_ms: int
) -> dict[str, float]:
    """Add one transaction to a customer's history and return its spending features.

    Raises:
        LateEvent: if ``event_ms`` is more than ``grace_ms`` behind the newest event seen.
    """
    if state.max_ts and event_ms < state.max_ts - grace_ms:
        raise LateEvent(event_ms, state.max_ts, grace_ms)
    # Insert after any equal timestamps: ties count in arrival (transaction id) order.
    pos = bisect_right(state.ts, event_ms)
    state.ts.insert(pos, event_ms)
    state.amount.insert(pos, amount)
    state.max_ts = max(state.max_ts, event_ms)
    # Keep what a future (possibly late, within grace) event's 30-day window could need.
    horizon = state.max_ts - grace_ms - _MAX_CUSTOMER_SPAN_MS
    drop = bisect_right(state.ts, horizon)
    if drop:
        del state.ts[:drop]
        del state.amount[:drop]
        pos -= drop
    out: dict[str, float] = {}
    end = pos + 1  # the current transaction, and earlier arrivals at the same time
    for n in WINDOWS_DAYS:
        start = bisect_right(state.ts, event_ms - n * DAY_MS, 0, end)
        count = end - start
        total = sum(state.amount[start:end])
        out[f"customer_nb_tx_{n}d"] = float(count)
        out[f"customer_avg_amount_{n}d"] = total / count
    return out


@dataclass
class TerminalState:
    """Per-terminal labels: parallel lists sorted by transaction time."""

    ts: list[int]
    fraud: list[int]
    tx_ids: list[int]
    max_ts: int

    @classmethod
    def from_state(cls, raw: Any) -> TerminalState:
        if not raw:
            return cls([], [], [], 0)
        return cls(list(raw["ts"]), list(raw["fraud"]), list(raw["tx_ids"]), int(raw["max_ts"]))

    def to_state(self) -> dict[str, Any]:
        return {"ts": self.ts, "fraud": self.fraud, "tx_ids": self.tx_ids, "max_ts": self.max_ts}


def add_label(
    state: TerminalState, tx_ms: int, transaction_id: int, is_fraud: int, grace_ms: int
) -> bool:
    """Record a transaction's label; a repeated label (same transaction) changes nothing.

    Returns:
        True if the label was new.
    """
    lo = bisect_right(state.ts, tx_ms - 1)
    hi = bisect_right(state.ts, tx_ms)
    if transaction_id in state.tx_ids[lo:hi]:
        return False
    state.ts.insert(hi, tx_ms)
    state.fraud.insert(hi, int(is_fraud))
    state.tx_ids.insert(hi, transaction_id)
    _prune_terminal(state, grace_ms)
    return True


def _prune_terminal(state: TerminalState, grace_ms: int) -> None:
    horizon = state.max_ts - grace_ms - _MAX_TERMINAL_SPAN_MS
    drop = bisect_right(state.ts, horizon)
    if drop:
        del state.ts[:drop]
        del state.fraud[:drop]
        del state.tx_ids[:drop]


def terminal_features(state: TerminalState, event_ms: int, grace_ms: int) -> dict[str, float]:
    """Terminal risk features for a transaction at ``event_ms`` (advances the terminal's
    clock, so old labels can be pruned)."""
    state.max_ts = max(state.max_ts, event_ms)
    _prune_terminal(state, grace_ms)
    upper = event_ms - LABEL_DELAY_DAYS * DAY_MS
    end = bisect_right(state.ts, upper)
    out: dict[str, float] = {}
    for n in WINDOWS_DAYS:
        start = bisect_right(state.ts, upper - n * DAY_MS, 0, end)
        count = end - start
        frauds = sum(state.fraud[start:end])
        out[f"terminal_nb_tx_{n}d"] = float(count)
        out[f"terminal_risk_{n}d"] = frauds / count if count else 0.0
    return out

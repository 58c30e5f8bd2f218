"""Pure window logic of the enrichment stage, on the per-entity state lists that the
quixstreams app keeps in its state store (with changelog topics).

Customer spending (SIMULATOR.md): for a transaction at ``t``, the number of the customer's
transactions in ``(t - n days, t]`` and their mean amount, the current one included.
Customer behaviour (feature service v2; definitions in ``stages.shared.schemas`` next to
``BEHAVIOUR_FEATURES``): amount relative to the 7/30-day means, seconds since the previous
transaction (capped at 30 days), distinct terminals over 1/7 days, amount and the week's
largest amount relative to the 30-day median. ``training.features``
computes both, vectorised, by the same definitions (tests/unit/test_features.py checks that
the two agree event by event, late events and ties included).

Terminal risk: over the terminal's transactions in ``(t - (7+n) days, t - 7 days]``, their
number and fraud fraction. Every transaction gets a label (fraud or not) that is known
7 days later, so the window is computed from the ``labels`` stream alone: a label carries its
transaction's time, and the window's upper bound ``t - 7 days`` means that every label it
needs became known at or before ``t``. The pipeline serves these windows from the label index
(``stages/shared/labels.py``, counted per event by the prediction stage); the per-terminal
stream formulation it is checked against is a test reference (tests/terminal_reference.py).
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field
from statistics import median
from typing import Any

from stages.shared.schemas import (
    AMOUNT_RATIO_DAYS,
    BEHAVIOUR_VIEW,
    CUSTOMER_VIEW,
    DAY_MS,
    DISTINCT_TERMINAL_DAYS,
    MAX_AMOUNT_DAYS,
    MAX_GAP_S,
    MEDIAN_RATIO_DAYS,
    WINDOWS_DAYS,
    InvalidMessage,
)

_MAX_CUSTOMER_SPAN_MS = max(WINDOWS_DAYS) * DAY_MS


class LateEvent(InvalidMessage):
    """An event older than the grace period allows: its windows can no longer be exact."""

    def __init__(self, event_ms: int, watermark_ms: int, grace_ms: int) -> None:
        super().__init__(
            "late_event",
            f"event time {event_ms} is {watermark_ms - event_ms} ms behind the newest event "
            f"{watermark_ms} (grace {grace_ms} ms)",
        )


# A terminal id recorded by a state written before terminals were kept (see CustomerState).
UNKNOWN_TERMINAL = -1
_MAX_GAP_MS = MAX_GAP_S * 1000


@dataclass
class CustomerState:
    """Per-customer history: parallel lists sorted by event time, and the newest time seen.

    ``terminal`` was added with the behaviour features: a state stored before it gets
    :data:`UNKNOWN_TERMINAL` for its older entries, which the distinct-terminal counts skip
    (an undercount that ends once those entries leave the 7-day window).
    """

    ts: list[int]
    amount: list[float]
    max_ts: int
    terminal: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.terminal) < len(self.ts):
            pad = [UNKNOWN_TERMINAL] * (len(self.ts) - len(self.terminal))
            self.terminal = pad + self.terminal

    @classmethod
    def from_state(cls, raw: Any) -> CustomerState:
        if not raw:
            return cls([], [], 0)
        return cls(
            list(raw["ts"]), list(raw["amount"]), int(raw["max_ts"]), list(raw.get("terminal", ()))
        )

    def to_state(self) -> dict[str, Any]:
        return {
            "ts": self.ts,
            "amount": self.amount,
            "max_ts": self.max_ts,
            "terminal": self.terminal,
        }


def update_customer(
    state: CustomerState, event_ms: int, amount: float, grace_ms: int
) -> dict[str, float]:
    """Add one transaction to a customer's history and return its spending features.

    Raises:
        LateEvent: if ``event_ms`` is more than ``grace_ms`` behind the newest event seen.
    """
    return customer_features(state, event_ms, amount, UNKNOWN_TERMINAL, grace_ms)[CUSTOMER_VIEW]


def customer_features(
    state: CustomerState, event_ms: int, amount: float, terminal_id: int, grace_ms: int
) -> dict[str, dict[str, float]]:
    """Add one transaction to a customer's history and return its features per view
    (``customer_spending`` and ``customer_behaviour``).

    Raises:
        LateEvent: if ``event_ms`` is more than ``grace_ms`` behind the newest event seen.
    """
    if state.max_ts and event_ms < state.max_ts - grace_ms:
        raise LateEvent(event_ms, state.max_ts, grace_ms)
    # Insert after any equal timestamps: ties count in arrival (transaction id) order.
    pos = bisect_right(state.ts, event_ms)
    state.ts.insert(pos, event_ms)
    state.amount.insert(pos, amount)
    state.terminal.insert(pos, terminal_id)
    state.max_ts = max(state.max_ts, event_ms)
    # Keep what a future (possibly late, within grace) event's 30-day window could need.
    horizon = state.max_ts - grace_ms - _MAX_CUSTOMER_SPAN_MS
    drop = bisect_right(state.ts, horizon)
    if drop:
        del state.ts[:drop]
        del state.amount[:drop]
        del state.terminal[:drop]
        pos -= drop
    spending: dict[str, float] = {}
    end = pos + 1  # the current transaction, and earlier arrivals at the same time
    for n in WINDOWS_DAYS:
        start = bisect_right(state.ts, event_ms - n * DAY_MS, 0, end)
        count = end - start
        total = sum(state.amount[start:end])
        spending[f"customer_nb_tx_{n}d"] = float(count)
        spending[f"customer_avg_amount_{n}d"] = total / count
    behaviour: dict[str, float] = {}
    for n in AMOUNT_RATIO_DAYS:
        mean = spending[f"customer_avg_amount_{n}d"]
        behaviour[f"customer_amount_ratio_{n}d"] = amount / mean if mean > 0 else 1.0
    gap_ms = event_ms - state.ts[pos - 1] if pos else _MAX_GAP_MS
    behaviour["customer_secs_since_prev_tx"] = min(gap_ms, _MAX_GAP_MS) / 1000.0
    for n in DISTINCT_TERMINAL_DAYS:
        start = bisect_right(state.ts, event_ms - n * DAY_MS, 0, end)
        seen = set(state.terminal[start:end])
        seen.discard(UNKNOWN_TERMINAL)
        behaviour[f"customer_nb_terminals_{n}d"] = float(len(seen))
    start = bisect_right(state.ts, event_ms - MEDIAN_RATIO_DAYS * DAY_MS, 0, end)
    usual = median(state.amount[start:end])
    behaviour[f"customer_amount_median_ratio_{MEDIAN_RATIO_DAYS}d"] = (
        amount / usual if usual > 0 else 1.0
    )
    start = bisect_right(state.ts, event_ms - MAX_AMOUNT_DAYS * DAY_MS, 0, end)
    largest = max(state.amount[start:end])
    behaviour[f"customer_max_amount_median_ratio_{MAX_AMOUNT_DAYS}d"] = (
        largest / usual if usual > 0 else 1.0
    )
    return {CUSTOMER_VIEW: spending, BEHAVIOUR_VIEW: behaviour}

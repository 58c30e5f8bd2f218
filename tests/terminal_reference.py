"""The per-event terminal windows the enrichment stage once computed in its own state: the
reference that the label index (stages/shared/labels.py) is checked against, on the
windows' edges (tests/unit/test_stage_logic.py) and on random labels on a Redis Cluster
(tests/cluster/test_label_index_cluster.py). Not on any serving path."""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass
from typing import Any

from stages.shared.schemas import DAY_MS, LABEL_DELAY_DAYS, WINDOWS_DAYS

_MAX_TERMINAL_SPAN_MS = (LABEL_DELAY_DAYS + max(WINDOWS_DAYS)) * DAY_MS


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

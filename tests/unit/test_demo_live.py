"""The demo's live-rate summary (stages.ops.demo.print_live): latency per hop and, when the
broker was measured, its cores and JIT share."""

from __future__ import annotations

import numpy as np

from stages.ops import demo
from stages.ops.latency import Decisions


def _rows(n: int) -> np.ndarray:
    """Decisions 1 ms apart whose hops take 1, 2, 3 and 4 ms."""
    d = Decisions()
    for i in range(n):
        ingest = 1_000_000 + i
        d.ts[i] = (ingest, ingest + 1, ingest + 3, ingest + 6, ingest + 10)
    return d.of(range(n))


def test_live_summary_prints_latency_per_hop_and_the_broker_when_measured() -> None:
    rows = _rows(200)
    with demo.console.capture() as cap:
        demo.print_live(rows, 500.0, {"broker cores": 0.912, "broker jit cores": 0.354})
    out = " ".join(cap.get().split())
    assert "p50 10 ms, p99 10 ms" in out
    assert "ingest -> enriched 1 / 1" in out and "routed -> visible 4 / 4" in out
    assert "broker meanwhile: 0.91 cores, of them its JIT compiler threads 0.35" in out
    with demo.console.capture() as cap:
        demo.print_live(rows, 500.0)
    assert "broker" not in cap.get()
    with demo.console.capture() as cap:
        demo.print_live(rows[:0], 500.0, {"broker cores": 1.0, "broker jit cores": 0.0})
    assert cap.get().strip() == "live rate: no decisions"

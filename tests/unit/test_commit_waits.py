"""Where the stages wait in their commits (stages/ops/commit_waits.py): the commit-step
totals read from real /metrics endpoints on free ports, their differences over a stretch of
wall time, and the bench's table of them."""

from __future__ import annotations

import math
import socket

import pytest

from stages.ops.commit_waits import read_totals, stage_shares, waits_between
from stages.shared.metrics import COMMIT_PHASES, build_metrics


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_totals_are_summed_over_the_processes_and_a_silent_one_is_skipped() -> None:
    ports = []
    for flushes in ([0.010, 0.030], [0.020]):
        m = build_metrics()
        for seconds in flushes:
            m.commit_phase.labels("enrichment", "flush").observe(seconds)
        m.commit_phase.labels("routing", "end_txn").observe(0.005)
        port = _free_port()
        m.serve("127.0.0.1", port)
        ports.append(port)
    silent = _free_port()  # a process not serving yet has waited for nothing
    totals = read_totals("127.0.0.1", [*ports, silent], timeout_s=1.0)
    assert set(totals) == {("enrichment", "flush"), ("routing", "end_txn")}
    seconds, count = totals[("enrichment", "flush")]
    assert seconds == pytest.approx(0.060) and count == 3
    assert totals[("routing", "end_txn")] == (pytest.approx(0.010), 2)


def test_waits_between_two_readings_are_shares_of_the_wall_time_and_means_per_commit() -> None:
    before = {("prediction", "flush"): (1.0, 10.0), ("prediction", "end_txn"): (0.5, 10.0)}
    after = {
        ("prediction", "flush"): (3.0, 110.0),  # 2 s over 100 commits in 4 s
        ("prediction", "end_txn"): (0.5, 10.0),  # nothing new
        ("routing", "offsets"): (0.4, 8.0),  # first seen after the first reading
    }
    waits = waits_between(before, after, 4.0)
    flush = waits[("prediction", "flush")]
    assert (flush.share, flush.mean_ms, flush.commits) == (0.5, pytest.approx(20.0), 100)
    idle = waits[("prediction", "end_txn")]
    assert idle.share == 0.0 and idle.commits == 0 and math.isnan(idle.mean_ms)
    assert waits[("routing", "offsets")].mean_ms == pytest.approx(50.0)
    assert stage_shares(waits) == {"prediction": 0.5, "routing": pytest.approx(0.1)}
    with pytest.raises(ValueError, match="no wall time"):
        waits_between(before, after, 0.0)


def test_the_bench_table_has_a_row_per_phase_and_stage_with_each_step() -> None:
    from bench.pipeline import WAIT_PREFIX, Phase, PipelineResults
    from bench.run import commit_wait_section

    stats = {"eps": 200.0}
    for stage, step, share, ms, commits in (
        ("enrichment", "flush", 0.25, 12.0, 100),
        ("enrichment", "end_txn", 0.10, 5.0, 100),
        ("routing", "end_txn", 0.05, 4.0, 60),
    ):
        stats[f"{WAIT_PREFIX}{stage} {step} share"] = share
        stats[f"{WAIT_PREFIX}{stage} {step} ms"] = ms
        stats[f"{WAIT_PREFIX}{stage} {step} commits"] = commits
    section = commit_wait_section(PipelineResults(1.0, 1.0, [Phase("200 events/s", 200, stats)]))
    header = next(line for line in section.splitlines() if line.startswith("| phase"))
    assert header == "| phase | stage | " + " | ".join(COMMIT_PHASES) + " | all | commits |"
    rows = [line for line in section.splitlines() if line.startswith("| 200 events/s")]
    assert rows == [
        "| 200 events/s | enrichment | - | - | 25 % (12.0) | 10 % (5) | 35 % | 100 |",
        "| 200 events/s | routing | - | - | - | 5 % (4) | 5 % | 60 |",
    ]

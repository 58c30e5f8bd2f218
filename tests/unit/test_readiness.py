"""Readiness as the stages report it: the partitions each process holds
(stages/shared/metrics.py ``Assignment``), summed over processes from their /metrics
(stages/ops/harness/readiness.py), served by real HTTP servers on free ports."""

from __future__ import annotations

import socket
from typing import NamedTuple

from stages.ops.harness.readiness import held_partitions
from stages.shared.metrics import Assignment, build_metrics


class TP(NamedTuple):
    topic: str
    partition: int


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _held(metrics: object, stage: str, group: str) -> float:
    return metrics.registry.get_sample_value(  # type: ignore[attr-defined, no-any-return]
        "rtpipe_assigned_partitions", {"stage": stage, "group": group}
    )


def test_assignment_follows_cooperative_and_eager_callbacks() -> None:
    m = build_metrics()
    a = Assignment(m, "routing", "g", ["in"])
    assert _held(m, "routing", "g") == 0
    a.assigned([TP("in", 0), TP("in", 1), TP("changelog", 0)])  # other topics are not inputs
    assert _held(m, "routing", "g") == 2
    a.assigned([TP("in", 1), TP("in", 2)])  # an eager re-assign repeats what is held
    assert _held(m, "routing", "g") == 3
    a.revoked([TP("in", 0)])  # a cooperative revoke of one
    assert _held(m, "routing", "g") == 2
    a.clear()
    assert _held(m, "routing", "g") == 0


def test_held_partitions_sums_the_processes_of_a_group() -> None:
    ports = []
    for parts in ([0, 1], [2, 3]):
        m = build_metrics()
        Assignment(m, "prediction", "grp", ["x"]).assigned([TP("x", p) for p in parts])
        Assignment(m, "prediction", "other", ["y"]).assigned([TP("y", 0)])
        port = _free_port()
        m.serve("127.0.0.1", port)
        ports.append(port)
    unreachable = _free_port()  # a process that has not started serving: holds nothing
    assert held_partitions("127.0.0.1", [*ports, unreachable], timeout_s=1.0) == {
        "grp": 4,
        "other": 2,
    }

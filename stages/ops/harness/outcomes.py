"""Waiting for a run's outcomes: the audit repeated until every replayed transaction has one
(see :mod:`stages.ops.audit`), a stage process has died, or time is up.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from stages.ops.audit import AuditReport, audit
from stages.ops.harness.processes import StageProcess, exited
from stages.shared.settings import Settings


def drain(
    settings: Settings,
    expected: list[int],
    procs: Sequence[StageProcess] = (),
    timeout_s: float = 120.0,
    every_s: float = 1.0,
) -> AuditReport:
    """Audit every ``every_s`` until no transaction of ``expected`` lacks an outcome,
    ``timeout_s`` has passed or one of ``procs`` has exited; the last audit."""
    deadline = time.monotonic() + timeout_s
    while True:
        report = audit(settings, expected)
        if not report.lost or time.monotonic() > deadline or exited(procs):
            return report
        time.sleep(every_s)

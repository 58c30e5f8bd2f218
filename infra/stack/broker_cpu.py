"""CPU the broker's JVM spends, in all and in its JIT compiler threads, read from Linux's
``/proc/PID/task/*`` (thread names and user + system clock ticks).

A broker fresh from its start compiles its hot code for minutes: on this 2-core machine its
C1 and C2 compiler threads took 0.3-0.5 cores through the first minutes of load, and again
for a while whenever the load took a shape it had not seen (max speed, then fixed rates).
The bench warms the broker up before its measured phases and prints both; the demo prints
the broker's cores and JIT share through its live-rate phase.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from infra.stack.procs import owned_pid
from stages.shared.settings import Settings

# HotSpot's compiler threads ("C2 CompilerThread0", "C1 CompilerThre..." in the 15 bytes of
# a Linux thread name).
JIT_THREAD_PREFIXES = ("C1 CompilerThre", "C2 CompilerThre")


@dataclass(frozen=True)
class CpuSample:
    at_s: float  # monotonic clock
    total_s: float  # CPU seconds of every thread
    jit_s: float  # CPU seconds of the JIT compiler threads


def thread_cpu(proc: Path, ticks_per_s: float) -> tuple[float, float]:
    """(all threads, JIT compiler threads) CPU seconds of the process at ``proc``
    (``/proc/PID``). Threads that end while being read are skipped."""
    total = jit = 0.0
    try:
        tasks = list((proc / "task").iterdir())
    except OSError:
        return total, jit
    for task in tasks:
        try:
            name = (task / "comm").read_text().strip()
            # Fields after the parenthesised name: utime and stime are the 12th and 13th.
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        seconds = (int(fields[11]) + int(fields[12])) / ticks_per_s
        total += seconds
        if name.startswith(JIT_THREAD_PREFIXES):
            jit += seconds
    return total, jit


class BrokerCpu:
    """Samples one broker process; :meth:`cores` turns two samples into cores used."""

    def __init__(self, pid: int, proc_root: Path = Path("/proc")) -> None:
        self._proc = proc_root / str(pid)
        self._ticks = float(os.sysconf("SC_CLK_TCK")) if hasattr(os, "sysconf") else 100.0

    def sample(self) -> CpuSample:
        total, jit = thread_cpu(self._proc, self._ticks)
        return CpuSample(time.monotonic(), total, jit)

    @staticmethod
    def cores(before: CpuSample, after: CpuSample) -> dict[str, float]:
        """Cores the broker used between two samples: ``broker cores`` and, of them, ``broker
        jit cores`` (empty when no time passed)."""
        dt = after.at_s - before.at_s
        if dt <= 0:
            return {}
        return {
            "broker cores": (after.total_s - before.total_s) / dt,
            "broker jit cores": (after.jit_s - before.jit_s) / dt,
        }


def broker_probe(settings: Settings) -> BrokerCpu | None:
    """A CPU probe of the stack's broker, when this machine has ``/proc`` and the broker is
    ours (the single node's)."""
    pid = owned_pid(settings, "kafka")
    if pid is None or not Path(f"/proc/{pid}/task").is_dir():
        return None
    return BrokerCpu(pid)

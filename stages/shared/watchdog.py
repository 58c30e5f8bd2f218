"""Loop watchdogs: a stage process whose loop stops turning (blocked in a call that no
timeout of its own ends) starts again as a new process.

Seen after broker restarts and kills: librdkafka's ``send_offsets_to_transaction`` blocked
for minutes although given 30 s (the routing stage, in the quick and the full Kafka-restart
chaos runs), and quixstreams' checkpoint commit blocked in the same call for good (the
enrichment customer app, after a broker of three was killed). librdkafka never checks the
timeout of its coordinator requests (confluentinc/librdkafka#5456, open, reproduced against
2.14.2; we run 2.12.1): while the group coordinator it has cached is down, the call waits
for a broker state change that may come much later, or never (#5511). A blocked loop
holds its partitions (static membership keeps them assigned) and decides nothing; in a new
process (``exec``: same pid, same command) the stage rejoins under its instance id, its new
producer takes the transactional id over (aborting what the blocked one left open) and its
consumer resumes from the committed offsets, so nothing is lost or decided twice.

Only stage processes watch their loops (``rtpipe run``, through
:func:`watch_loops_in_this_process`): a loop run in-process by a test or a tool has no
process of its own to restart.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from stages.shared.kafka import StopFlag

logger = logging.getLogger(__name__)


class LoopWatchdog:
    """Calls ``on_stuck`` (once, from its own thread) when :meth:`beat` has not been called
    for ``timeout_s`` while not :meth:`paused`: the loop it watches is blocked somewhere
    that no timeout of its own ends."""

    def __init__(self, timeout_s: float, on_stuck: Callable[[float], None]) -> None:
        self._timeout_s = timeout_s
        self._on_stuck = on_stuck
        self._beat = time.monotonic()
        self._paused = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="loop-watchdog", daemon=True)

    @property
    def timeout_s(self) -> float:
        return self._timeout_s

    def beat(self) -> None:
        self._beat = time.monotonic()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1
            self.beat()

    def start(self) -> None:
        self.beat()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        step = min(1.0, self._timeout_s / 4)
        while not self._stop.wait(step):
            idle = time.monotonic() - self._beat
            if not self._paused and idle >= self._timeout_s:
                self._on_stuck(idle)
                return


def restart_process() -> None:
    """Replace this process by a fresh run of the same command (``exec``): whatever the
    failed run held (file locks, librdkafka handles) is released by the kernel."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def restart_stuck(
    what: str, stop: StopFlag, before: Callable[[], object] | None = None
) -> Callable[[float], None]:
    """The ``on_stuck`` of a stage process's loop ``what``: its stacks to the log, then
    ``before()`` (e.g. stop a child process) and :func:`restart_process`. While the stage is
    stopping it only logs: whoever asked for the stop kills it if it does not finish."""

    def stuck(idle_s: float) -> None:
        if stop.is_set():
            logger.error("%s stuck for %.0fs while stopping (stacks follow)", what, idle_s)
            faulthandler.dump_traceback(all_threads=True)
            return
        logger.error(
            "%s has not turned its loop for %.0fs (stacks follow); the stage starts again "
            "as a new process",
            what,
            idle_s,
        )
        faulthandler.dump_traceback(all_threads=True)
        if before is not None:
            before()
        restart_process()

    return stuck


_process_timeout_s: float | None = None
_process_on_stuck: Callable[[str, StopFlag], Callable[[float], None]] = restart_stuck


def watch_loops_in_this_process(
    timeout_s: float | None,
    on_stuck: Callable[[str, StopFlag], Callable[[float], None]] = restart_stuck,
) -> None:
    """From now on every batch loop that runs in this process is watched: one that has not
    turned for ``timeout_s`` calls ``on_stuck(loop, stop)(idle_s)`` (by default its process
    starts again). None (or 0) turns it off. Called by ``rtpipe run`` for stage processes."""
    global _process_timeout_s, _process_on_stuck
    _process_timeout_s = timeout_s or None
    _process_on_stuck = on_stuck


def watch_loop(what: str, stop: StopFlag) -> LoopWatchdog | None:
    """A started watchdog for the loop ``what`` if this process watches its loops
    (:func:`watch_loops_in_this_process`), else None. The caller beats it on every turn and
    stops it when the loop ends."""
    if _process_timeout_s is None:
        return None
    dog = LoopWatchdog(_process_timeout_s, _process_on_stuck(what, stop))
    dog.start()
    return dog

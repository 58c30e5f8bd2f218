"""The enrichment stage's process supervision: its labels process runs as a child of the
stage process, restarted when it exits and never outliving it (Linux ``PR_SET_PDEATHSIG``).

Kept apart from the apps so the labels process starts without importing quixstreams.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING

from stages.shared.settings import Settings, settings_to_env

if TYPE_CHECKING:
    from stages.shared.kafka import StopFlag
    from stages.shared.metrics import Metrics

logger = logging.getLogger(__name__)

STAGE = "enrichment"
# Set in the labels process's environment: the pid of the stage process supervising it.
SUPERVISOR_PID_ENV = "RTPIPE_ENRICHMENT_SUPERVISOR_PID"
_PR_SET_PDEATHSIG = 1


def die_with_supervisor() -> None:
    """In the labels process: exit (SIGTERM) when the stage process that started it dies,
    even by SIGKILL, so a crashed stage never leaves an orphan consuming in its group."""
    expected = os.environ.get(SUPERVISOR_PID_ENV)
    if not expected:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        logger.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    if os.getppid() != int(expected):
        # The supervisor died before prctl took effect.
        logger.error("enrichment supervisor %s is gone; exiting", expected)
        raise SystemExit(1)


def run_stage(settings: Settings, stop: StopFlag, metrics: Metrics | None = None) -> None:
    """The enrichment stage's entry point (stages/shared/topology.py): the labels process
    first, so it starts while this one imports the customer app (quixstreams), then the
    customer app until ``stop``."""
    labels = LabelsProcess(settings)
    labels.start()
    from stages.enrichment.app import ProcessRestartRequired, run

    try:
        run(settings, stop, metrics, labels=labels)
    except ProcessRestartRequired as exc:
        # The labels process is stopped by now (run's finally). The same pid, log and
        # arguments: a supervisor watching this process sees it carry on.
        logger.error("enrichment stage restarts as a new process: %s", exc)
        restart_process()


def restart_process() -> None:
    """Replace this process by a fresh run of the same command (``exec``): whatever the
    failed run held (file locks, librdkafka handles) is released by the kernel."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def run_labels_part(settings: Settings, stop: StopFlag, metrics: Metrics) -> None:
    """The labels process (``rtpipe run enrichment --part labels``), started by
    :class:`LabelsProcess`: it imports neither quixstreams nor Feast, and ends with its
    supervisor."""
    from stages.enrichment.labels import run as run_labels

    die_with_supervisor()
    run_labels(settings, stop, metrics)


class LabelsProcess:
    """Starts the labels process as a child and restarts it (with backoff) whenever it
    exits while the stage is running."""

    def __init__(self, settings: Settings) -> None:
        self._env = {
            **os.environ,
            **settings_to_env(settings),
            SUPERVISOR_PID_ENV: str(os.getpid()),
        }
        self._stop = threading.Event()
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        # The child is started from this thread, which lives as long as the stage does:
        # PR_SET_PDEATHSIG fires when the *thread* that forked the child ends.
        self._thread = threading.Thread(target=self._supervise, name="enrichment-labels")

    def start(self) -> None:
        self._thread.start()

    def _supervise(self) -> None:
        backoff_s = 1.0
        while not self._stop.is_set():
            started = time.monotonic()
            with self._lock:
                if self._stop.is_set():
                    break
                self._proc = subprocess.Popen(
                    [sys.executable, "-m", "stages.cli", "run", STAGE, "--part", "labels"],
                    env=self._env,
                )
            logger.info("enrichment labels process %d started", self._proc.pid)
            code = self._proc.wait()
            if self._stop.is_set():
                break
            if time.monotonic() - started > 60:
                backoff_s = 1.0
            logger.error(
                "enrichment labels process exited with %s; restarting in %.0fs", code, backoff_s
            )
            self._stop.wait(backoff_s)
            backoff_s = min(backoff_s * 2, 30.0)

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """Ask the child to finish (SIGTERM), kill it after ``timeout_s``; its exit code."""
        with self._lock:
            self._stop.set()
            proc = self._proc
        if proc is None:
            self._thread.join(timeout_s)
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            logger.error("enrichment labels process %d did not stop; killing it", proc.pid)
            proc.kill()
            code = proc.wait()
        self._thread.join(timeout_s)
        return code

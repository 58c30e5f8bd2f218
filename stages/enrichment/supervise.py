"""The enrichment stage's process supervision: its labels process runs as a child of the
stage process, restarted when it exits and never outliving it (Linux ``PR_SET_PDEATHSIG``).

Kept apart from the apps so the labels process starts without importing quixstreams; the
stage process imports the customer app (quixstreams) only once its labels process is
started (:func:`run_stage`).
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

from stages.shared.errors import RtpipeError
from stages.shared.settings import Settings, settings_to_env
from stages.shared.watchdog import LoopWatchdog, restart_process, restart_stuck

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
    """The enrichment stage's entry point (stages/shared/topology.py) until ``stop``: the
    labels process first, so it starts while this one imports the customer app
    (quixstreams), then the customer app in this process, watched by a
    :class:`~stages.shared.watchdog.LoopWatchdog`. A customer app that cannot go on in this
    process (its loop stuck, or its state locked by a failed predecessor) starts the stage
    again as a new process."""
    from stages.shared.kafka import ensure_topics
    from stages.shared.metrics import build_metrics

    labels = LabelsProcess(settings)
    labels.start()
    ensure_topics(settings.kafka, settings.topics)

    watchdog = LoopWatchdog(
        settings.enrichment.loop_watchdog_s,
        restart_stuck("enrichment customer app", stop, before=labels.stop),
    )
    watchdog.start()
    try:
        run_customer_app(settings, metrics or build_metrics(), stop, watchdog)
    except ProcessRestartRequired as exc:
        watchdog.stop()
        logger.error("enrichment stage restarts as a new process: %s", exc)
        labels.stop()
        restart_process()
    finally:
        watchdog.stop()
        code = labels.stop()
        logger.info("enrichment labels process stopped (exit code %s)", code)


class ProcessRestartRequired(RtpipeError, RuntimeError):
    """The customer app cannot be rebuilt in this process: a failed app left a RocksDB
    partition of its state open (its LOCK is held by this process), and every new app
    waits for it in vain. Only a new process releases it."""


def _holds_rocksdb_lock(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if "While lock file" in str(seen):  # RocksDB's IOError on a LOCK held
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def run_customer_app(
    settings: Settings, metrics: Metrics, stop: StopFlag, watchdog: LoopWatchdog | None = None
) -> None:
    """Run the customer-window application until ``stop`` (SIGTERM or SIGINT).

    quixstreams stops on a failed checkpoint (a broker down for longer than the transaction
    timeout, a fenced producer) and leaves the restart to a supervisor. The stage is its own
    supervisor: it rebuilds the application, which resumes from the committed offsets and
    the changelogs (exactly-once), until it is asked to stop. Until quixstreams installs its
    own handlers (in ``app.run()``), SIGTERM/SIGINT set ``stop``, checked before each run.

    Raises:
        ProcessRestartRequired: a rebuilt app found its state locked by the failed one
            (seen after a broker of three was killed: the fenced app kept a partition's
            RocksDB open); the caller starts the stage again in a new process.
    """
    from stages.enrichment.app import build_customer_app

    backoff_s = 1.0
    while not stop.is_set():
        started = time.monotonic()
        try:
            # Inside the try: building it fetches topic metadata, which fails while the
            # broker is still down.
            if watchdog is not None:
                watchdog.beat()
            app = build_customer_app(settings, metrics)
            if watchdog is not None:
                app.watch_loop(watchdog)
            if stop.is_set():
                return  # asked to stop while starting
            app.run()
            return  # stopped by a signal
        except Exception as exc:
            if _holds_rocksdb_lock(exc):
                raise ProcessRestartRequired(str(exc)) from exc
            if time.monotonic() - started > 60:
                backoff_s = 1.0  # it ran fine for a while: this is a new failure
            # Between runs our handlers apply (quixstreams installs its own inside run()).
            stop.install_signal_handlers()
            logger.exception("enrichment customer app failed; restarting in %.0fs", backoff_s)
        deadline = time.monotonic() + backoff_s
        while not stop.is_set() and time.monotonic() < deadline:
            time.sleep(0.1)
        backoff_s = min(backoff_s * 2, 30.0)


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

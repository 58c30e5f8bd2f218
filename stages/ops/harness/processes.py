"""Processes of a run: each stage (or any ``python -m`` module, such as the retrain job or
a bench baseline) as its own process rebuilt from the same settings, and its end: SIGTERM,
then its stacks (SIGUSR1) and SIGKILL if it does not stop. When started stages are
serving: :func:`stages.ops.harness.readiness.wait_until_ready`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from stages.shared.procenv import drop_feast_prometheus_dirs
from stages.shared.settings import Settings, settings_to_env
from stages.shared.topology import PIPELINE_STAGES

logger = logging.getLogger(__name__)


@dataclass
class StageProcess:
    """A process started by :func:`start_process` (a stage replica, the retrain job, ...)."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    # The replica's stable instance id (RTPIPE_INSTANCE_ID): a restart reuses it.
    replica: int = 0


def child_env(settings: Settings) -> dict[str, str]:
    """Environment that rebuilds the same settings in a child process (``RTPIPE_*`` of
    this process replaced, paths made absolute)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RTPIPE_")}
    drop_feast_prometheus_dirs(env)
    resolved = settings.model_copy(
        update={"home": settings.home.resolve(), "feature_repo": settings.feature_repo.resolve()}
    )
    env.update(settings_to_env(resolved))
    return env


def start_process(
    settings: Settings, name: str, module_args: Sequence[str], replica: int = 0
) -> StageProcess:
    """Start ``python -m MODULE_ARGS...`` with ``settings``, in its own session (so a
    ``kill -9`` of its group takes its children too), logging to
    ``run_dir/stages/PREFIXNAME[.REPLICA].log``."""
    log_dir = settings.run_dir / "stages"
    log_dir.mkdir(parents=True, exist_ok=True)
    suffix = f".{replica}" if replica else ""
    log = log_dir / f"{settings.topics.prefix}{name}{suffix}.log"
    with log.open("ab") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", *module_args],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=child_env(settings),
            start_new_session=True,
        )
    return StageProcess(name, proc, log, replica)


def start_stage(settings: Settings, name: str, replica: int = 0) -> StageProcess:
    """Start one replica of a stage as its own ``rtpipe run STAGE`` process, logging to the
    run dir. Replica ``r`` is instance ``r`` of its consumer groups (static membership and a
    stable transactional id: restarted with the same number, it takes its partitions back
    at once and aborts what its predecessor left open) and serves metrics on its stage's
    ports plus ``100 * r``."""
    return start_process(
        replica_settings(settings, replica), name, ("stages.cli", "run", name), replica
    )


def replica_settings(settings: Settings, replica: int) -> Settings:
    """``settings`` for replica ``replica`` of a stage (its instance id and metrics ports)."""
    m = settings.metrics
    step = 100 * replica
    return settings.model_copy(
        update={
            "instance_id": str(replica),
            "metrics": m.model_copy(
                update={
                    "enrichment_port": m.enrichment_port + step,
                    "prediction_port": m.prediction_port + step,
                    "routing_port": m.routing_port + step,
                    "evaluation_port": m.evaluation_port + step,
                    "enrichment_labels_port": m.enrichment_labels_port + step,
                }
            ),
        }
    )


def start_stages(
    settings: Settings, names: tuple[str, ...] = PIPELINE_STAGES, replicas: int = 1
) -> list[StageProcess]:
    """Start ``replicas`` processes of each stage (see :func:`start_stage`)."""
    return [start_stage(settings, name, r) for name in names for r in range(replicas)]


def exited(procs: Sequence[StageProcess]) -> list[str]:
    """Names of the processes that are no longer running."""
    return [sp.name for sp in procs if sp.proc.poll() is not None]


def stop_stages(procs: Sequence[StageProcess], timeout_s: float = 30.0) -> dict[str, int | None]:
    """SIGTERM each process, wait for a graceful exit; a straggler gets SIGUSR1 (the stages
    print their stacks to their log then: where it hung) and SIGKILL. Returns each name's
    exit code."""
    for sp in procs:
        if sp.proc.poll() is None:
            sp.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    codes: dict[str, int | None] = {}
    for sp in procs:
        try:
            codes[sp.name] = sp.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            sp.proc.send_signal(signal.SIGUSR1)
            time.sleep(0.5)
            sp.proc.kill()
            codes[sp.name] = sp.proc.wait()
            logger.error(
                "%s did not stop within %.0fs: killed (its stacks are in %s)",
                sp.name,
                timeout_s,
                sp.log,
            )
    return codes


def kill9(sp: StageProcess) -> None:
    """SIGKILL the process's session (it leads its own: an enrichment stage's labels child
    goes too) and reap it."""
    # Not yet reaped (a zombie leader still holds its group id): the group is ours to kill.
    if sp.proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(sp.proc.pid, signal.SIGKILL)
    sp.proc.wait(10)

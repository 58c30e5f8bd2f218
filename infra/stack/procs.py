"""The stack's processes: whether a PID is alive and still the process we launched (so a
recycled PID is never signalled), starting one in its own session with its PID file, and
stopping it."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import cast

from infra.stack.components import STOP_TIMEOUT_S, Component
from infra.stack.nodes import KafkaNode, RedisNode
from infra.stack.paths import kafka_properties_file, pid_file, prometheus_config_file, redis_dir
from stages.shared.settings import Settings

logger = logging.getLogger(__name__)

# Children started by this interpreter, so they are reaped (no zombies, no ResourceWarning).
_children: dict[int, subprocess.Popen[bytes]] = {}


def _reap(pid: int) -> None:
    child = _children.get(pid)
    if child is not None and child.poll() is not None:
        del _children[pid]
        return
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (reaped first if it is our child; a zombie counts as dead)."""
    _reap(pid)
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # The state field follows the parenthesised command name; zombies are dead to us.
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def _cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def _owns(settings: Settings, comp: Component, pid: int) -> bool:
    """Whether ``pid`` is still the process we launched for ``comp`` in this run dir."""
    cmd = _cmdline(pid)
    if comp == "kafka":
        return "kafka.Kafka" in cmd and str(kafka_properties_file(settings)) in cmd
    if comp == "prometheus":
        return "prometheus" in cmd and f"--config.file={prometheus_config_file(settings)}" in cmd
    # redis-server rewrites its process title, so the command line keeps only the binary and
    # address; its working directory (``--dir``) identifies the run dir.
    try:
        cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
    except OSError:
        return False
    return "redis-server" in cmd and cwd == redis_dir(settings)


def kafka_node_owns(node: KafkaNode, pid: int) -> bool:
    """Whether ``pid`` is still the broker we launched for ``node``."""
    cmd = _cmdline(pid)
    return "kafka.Kafka" in cmd and str(node.conf_dir / "server.properties") in cmd


def redis_node_owns(node: RedisNode, pid: int) -> bool:
    """Whether ``pid`` is still the redis-server we launched for ``node`` (by its cwd)."""
    try:
        cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
    except OSError:
        return False
    return "redis-server" in _cmdline(pid) and cwd == node.dir


def _read_pid(settings: Settings, comp: str) -> int | None:
    try:
        return int(pid_file(settings, comp).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def owned_pid(settings: Settings, comp: Component) -> int | None:
    """PID of our live process for ``comp``, or None (stale PID files are removed)."""
    pid = _read_pid(settings, comp)
    if pid is None:
        return None
    if alive(pid) and _owns(settings, comp, pid):
        return pid
    logger.info("removing stale %s PID file (pid %d is not ours any more)", comp, pid)
    pid_file(settings, comp).unlink(missing_ok=True)
    return None


def owned_node_pid(settings: Settings, name: str, owns: Callable[[int], bool]) -> int | None:
    """PID of our live process for node ``name``, or None (stale PID files are removed)."""
    pid = _read_pid(settings, name)
    if pid is None:
        return None
    if alive(pid) and owns(pid):
        return pid
    logger.info("removing stale %s PID file (pid %d is not ours any more)", name, pid)
    pid_file(settings, name).unlink(missing_ok=True)
    return None


def spawn(settings: Settings, comp: str, cmd: Sequence[str], cwd: Path, log: Path) -> int:
    """Start ``cmd`` in its own session, output appended to ``log``; write its PID file."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            list(cmd),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # survives the caller; Ctrl-C in a shell does not reach it
        )
    _children[proc.pid] = proc
    pid_file(settings, comp).write_text(f"{proc.pid}\n")
    logger.info("started %s (pid %d), log %s", comp, proc.pid, log)
    return proc.pid


def log_tail(path: Path, lines: int = 5) -> str:
    """The last ``lines`` of a log, joined on one line for an error message."""
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


def terminate(pid: int) -> None:
    """Send SIGTERM to ``pid`` (its group when it leads one) without waiting."""
    try:
        group = os.getpgid(pid) == pid
    except ProcessLookupError:
        return
    with contextlib.suppress(ProcessLookupError):
        (os.killpg if group else os.kill)(pid, signal.SIGTERM)


def stop_process(settings: Settings, comp: str, pid: int, timeout: float | None = None) -> None:
    """SIGTERM ``pid``, SIGKILL after ``timeout`` (the component's stop timeout); wait for it."""
    if timeout is None:
        timeout = STOP_TIMEOUT_S[cast(Component, comp)]
    # Each component leads its own session; signal its group so helpers (redis' AOF rewrite
    # child) go too, but only when the group is really the one we created.
    try:
        group = os.getpgid(pid) == pid
    except ProcessLookupError:
        return
    kill: Callable[[int, int], None] = os.killpg if group else os.kill
    with contextlib.suppress(ProcessLookupError):
        kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive(pid):
        time.sleep(0.1)
    if alive(pid):
        logger.warning("%s (pid %d) ignored SIGTERM for %.0fs; sending SIGKILL", comp, pid, timeout)
        with contextlib.suppress(ProcessLookupError):
            kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and alive(pid):
            time.sleep(0.1)
    logger.info("stopped %s (pid %d)", comp, pid)

"""The single-node stack: one process per component, started and waited on until healthy."""

from __future__ import annotations

import logging
import shutil
import time

from infra.stack.components import START_TIMEOUT_S, Component
from infra.stack.config import (
    REDIS_SERVER_FLAGS,
    format_kafka_storage,
    kafka_java,
    write_kafka_config,
    write_prometheus_config,
)
from infra.stack.errors import StackError
from infra.stack.health import HEALTH
from infra.stack.install import ensure_kafka
from infra.stack.paths import component_port, log_file, redis_dir, run_dir, write_private
from infra.stack.procs import alive, log_tail, spawn
from infra.stack.secure import redis_config
from stages.shared.settings import Settings

logger = logging.getLogger(__name__)


def start_component(settings: Settings, comp: Component) -> int:
    """Prepare ``comp`` (jars, config, storage) and start its process; returns its PID."""
    run = run_dir(settings)
    run.mkdir(parents=True, exist_ok=True)
    if comp == "kafka":
        libs = ensure_kafka(settings)
        props = write_kafka_config(settings)
        format_kafka_storage(settings, libs, props)
        cmd = kafka_java(settings, libs, "kafka.Kafka", str(props))
        return spawn(settings, comp, cmd, run / "kafka", run / "kafka.console.log")
    if comp == "redis":
        rdir = redis_dir(settings)
        rdir.mkdir(parents=True, exist_ok=True)
        cmd = [shutil.which("redis-server") or "redis-server"]
        port_flag = "--port"
        if settings.stack.secure:
            # TLS only, ACL users (infra/stack/secure.py); in a private file, off argv.
            conf = rdir / "secure.conf"
            write_private(conf, redis_config(settings, settings.stack.redis_port, cluster=False))
            cmd.append(str(conf))
            port_flag = "--tls-port"
        elif settings.redis.password:
            # The password goes in a private config file, not on the visible command line.
            conf = rdir / "auth.conf"
            write_private(conf, f'requirepass "{settings.redis.password.get_secret_value()}"\n')
            cmd.append(str(conf))
        cmd += [
            port_flag,
            str(settings.stack.redis_port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(rdir),
            *REDIS_SERVER_FLAGS,
        ]
        return spawn(settings, comp, cmd, rdir, log_file(settings, comp))
    conf = write_prometheus_config(settings)
    cmd = [
        shutil.which("prometheus") or "prometheus",
        f"--config.file={conf}",
        f"--storage.tsdb.path={conf.parent / 'data'}",
        "--storage.tsdb.retention.time=7d",
        f"--web.listen-address=127.0.0.1:{settings.stack.prometheus_port}",
    ]
    return spawn(settings, comp, cmd, conf.parent, log_file(settings, comp))


def wait_healthy(settings: Settings, comp: Component, pid: int | None) -> None:
    """Wait until ``comp`` is healthy; StackError, with its log's tail, if it is not in time."""
    deadline = time.monotonic() + START_TIMEOUT_S[comp]
    while time.monotonic() < deadline:
        if HEALTH[comp](settings):
            logger.info("%s healthy on port %d", comp, component_port(settings, comp))
            return
        if pid is not None and not alive(pid):
            break
        time.sleep(0.25)
    log = log_file(settings, comp)
    tail = log_tail(log)
    if comp == "kafka":
        # JVM-level failures (bad heap, class path) never reach log4j's file.
        console = run_dir(settings) / "kafka.console.log"
        tail = " | ".join(t for t in (log_tail(console, 3), tail) if t)
        log = console if not log.exists() else log
    state = "exited" if pid is not None and not alive(pid) else "is not healthy"
    raise StackError(
        f"{comp} {state} after start (port {component_port(settings, comp)}); see {log}: {tail}"
    )

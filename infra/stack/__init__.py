"""The local single-machine stack: Kafka (KRaft, from Maven Central), Redis and Prometheus.

Every component runs as a plain child process in its own session, with its PID file, log and
data under ``settings.run_dir``::

    run/kafka.pid  run/kafka.log  run/kafka.console.log  run/kafka-data/  run/kafka/
    run/redis.pid  run/redis.log  run/redis/
    run/prometheus.pid  run/prometheus.log  run/prometheus/

The cluster stack (``stack.kafka_brokers > 1``, ``stack.redis_cluster``; ``rtpipe stack up
--brokers 3 --redis-cluster``) runs a KRaft quorum of combined broker/controller nodes and a
Redis Cluster (three masters, one replica each) instead, one process per node::

    run/kafka-N.pid  run/kafka-N.log  run/kafka-N/  run/kafka-N-data/  run/kafka-cluster.id
    run/redis-PORT.pid  run/redis-PORT.log  run/redis-PORT/

Secure mode (``stack.secure``, ``rtpipe stack up --secure``) starts the same processes with
TLS and authentication only, from certificates and passwords it makes under ``run/secure/``
(``secure``).

``up`` is idempotent: a component that already answers its health check on its port is left
alone and is not reported as started, so a caller stops only what it started (``down(only=...)``).
``down`` kills a process only if its PID file is ours and ``/proc/PID`` still shows the command
we launched, so a recycled PID is never killed.

This module is the public API (``up``, ``down``, ``status``); the rest of the package:
``install`` (binaries on ``PATH``, Kafka's jars), ``paths`` and ``nodes`` (where each
component's and each node's files and ports are), ``config`` (the files a start writes),
``procs`` (our processes: owned, spawned, stopped), ``health`` (the health checks), ``single``
and ``cluster`` (starting the single-node stack and the cluster stack), ``secure`` (secure
mode's material and what the servers and probes are given).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from infra.stack.cluster import cluster_status, down_cluster, up_cluster
from infra.stack.components import COMPONENTS, Component, ComponentStatus, validate_components
from infra.stack.config import ALERTS_FILE
from infra.stack.errors import StackError
from infra.stack.health import HEALTH, healthy, port_open
from infra.stack.install import ensure_kafka, preflight
from infra.stack.nodes import (
    KafkaNode,
    RedisNode,
    clustered,
    kafka_clustered,
    kafka_nodes,
    redis_clustered,
    redis_nodes,
)
from infra.stack.paths import component_port, log_file, pid_file
from infra.stack.procs import owned_pid, stop_process
from infra.stack.secure import ensure_material, secure_client_settings, secure_env_file
from infra.stack.single import start_component, wait_healthy
from stages.shared.settings import Settings

__all__ = [
    "ALERTS_FILE",
    "COMPONENTS",
    "Component",
    "ComponentStatus",
    "KafkaNode",
    "RedisNode",
    "StackError",
    "down",
    "ensure_kafka",
    "kafka_clustered",
    "kafka_nodes",
    "preflight",
    "redis_clustered",
    "redis_nodes",
    "secure_client_settings",
    "secure_env_file",
    "status",
    "up",
]

logger = logging.getLogger(__name__)


def up(
    settings: Settings, components: Iterable[str] = ("kafka", "redis", "prometheus")
) -> list[str]:
    """Start the components that are not already healthy and wait until they are.

    Components already healthy on their port (started earlier, by anyone) are left alone.
    If one fails to become healthy, whatever this call started is stopped again.

    Args:
        settings: Ports, run dir and credentials.
        components: Which components to bring up.

    Returns:
        The components this call started, in start order: pass them to ``down(only=...)``.

    Raises:
        StackError: A binary is missing, a port is taken by something that is not a healthy
            instance of the component, or a component does not become healthy in time.
    """
    comps = validate_components(components)
    todo = [c for c in comps if not healthy(settings, c)]
    if not todo:
        return []
    preflight(todo, settings)
    if settings.stack.secure:
        # Certificates and passwords first: every server's config refers to them.
        ensure_material(settings)
    started: list[Component] = []
    waiting: list[tuple[Component, int | None]] = []
    try:
        for comp in todo:
            if clustered(settings, comp):
                if up_cluster(settings, comp):
                    started.append(comp)
                continue
            pid = owned_pid(settings, comp)
            if pid is not None:
                # Ours and alive but not healthy yet: another `up` is starting it.
                waiting.append((comp, pid))
                continue
            ports = [component_port(settings, comp)]
            if comp == "kafka":
                ports.append(settings.stack.kafka_controller_port)
            for port in ports:
                if port_open(port):
                    raise StackError(
                        f"port {port} is in use by something that is not a healthy {comp}: "
                        f"stop it or choose another port (RTPIPE_STACK__...)"
                    )
            pid = start_component(settings, comp)
            started.append(comp)
            waiting.append((comp, pid))
        for comp, pid in waiting:
            wait_healthy(settings, comp, pid)
    except BaseException:
        if started:
            logger.error("stack up failed; stopping what this call started: %s", started)
            down(settings, only=started)
        raise
    return list(started)


def down(settings: Settings, only: Iterable[str] | None = None) -> list[str]:
    """Stop the components whose PID files under the run dir are ours.

    A PID whose ``/proc`` command line is not the one we launched is never signalled; its
    stale PID file is removed. SIGTERM first, SIGKILL after a per-component timeout.

    Args:
        settings: Which run dir to look in.
        only: Components to stop; ``None`` means all. An empty list stops nothing, so the
            result of ``up`` can always be passed back.

    Returns:
        The components actually stopped.
    """
    comps = list(COMPONENTS) if only is None else validate_components(only)
    stopped: list[str] = []
    # Reverse dependency order: Prometheus first, Kafka last.
    for comp in reversed(comps):
        # Cluster nodes too, found by their PID files whatever mode ``settings`` are in.
        node_stopped = comp != "prometheus" and down_cluster(settings, comp)
        pid = owned_pid(settings, comp)
        if pid is not None:
            stop_process(settings, comp, pid)
            pid_file(settings, comp).unlink(missing_ok=True)
        if pid is not None or node_stopped:
            stopped.append(comp)
    return stopped


def status(settings: Settings) -> dict[str, ComponentStatus]:
    """Report each component: our process (if any) and whether its port is healthy.

    Args:
        settings: Ports and run dir.

    Returns:
        One ``ComponentStatus`` per component, keyed by name; a clustered component has one
        per node instead (``kafka-1``.., ``redis-PORT``..), each healthy when its cluster is.
    """
    out: dict[str, ComponentStatus] = {}
    for comp in COMPONENTS:
        if clustered(settings, comp):
            out.update((node.name, node) for node in cluster_status(settings, comp))
            continue
        pid = owned_pid(settings, comp)
        log = log_file(settings, comp)
        out[comp] = ComponentStatus(
            name=comp,
            running=pid is not None,
            pid=pid,
            port=component_port(settings, comp),
            healthy=HEALTH[comp](settings),
            log=log,
        )
    return out

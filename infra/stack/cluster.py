"""The cluster stack: a KRaft quorum and a Redis Cluster, one process per node.

``stack.kafka_brokers > 1``: a KRaft quorum of combined broker/controller nodes, one JVM each,
sharing one cluster id (``run/kafka-cluster.id``), each with its own node id, ports, config
(``run/kafka-N/``), data (``run/kafka-N-data/``), PID file and log (``run/kafka-N.*``).
``stack.redis_cluster``: a Redis Cluster of ``redis_cluster_masters`` masters and one replica
each, one redis-server per port with its own dir (``run/redis-PORT/``: nodes.conf, AOF).
``up``/``down`` still speak of the components ``kafka`` and ``redis`` (all their nodes);
``status`` reports every node.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from infra.stack.components import START_TIMEOUT_S, Component, ComponentStatus
from infra.stack.config import (
    REDIS_SERVER_FLAGS,
    format_storage,
    kafka_java,
    random_cluster_id,
    write_kafka_config,
)
from infra.stack.errors import StackError
from infra.stack.health import cluster_info, kafka_cluster_healthy, port_open, redis_cluster_healthy
from infra.stack.install import ensure_kafka
from infra.stack.nodes import KafkaNode, RedisNode, kafka_nodes, redis_nodes
from infra.stack.paths import pid_file, run_dir, write_private
from infra.stack.procs import (
    alive,
    kafka_node_owns,
    log_tail,
    owned_node_pid,
    redis_node_owns,
    spawn,
    stop_process,
    terminate,
)
from infra.stack.secure import redis_cli_args, redis_config
from stages.shared.settings import Settings

logger = logging.getLogger(__name__)


def _start_kafka_node(settings: Settings, libs: Path, node: KafkaNode, cluster_id: str) -> int:
    props = write_kafka_config(settings, node)
    format_storage(settings, libs, props, node.data_dir, cluster_id, node.name)
    cmd = kafka_java(settings, libs, "kafka.Kafka", str(props), conf_dir=node.conf_dir)
    return spawn(settings, node.name, cmd, node.conf_dir, node.console_log)


def _cluster_id(settings: Settings) -> str:
    """The Kafka cluster stack's id, made once and kept with its data."""
    path = run_dir(settings) / "kafka-cluster.id"
    if path.is_file():
        return path.read_text().strip()
    cid = random_cluster_id()
    path.write_text(cid + "\n")
    return cid


def _start_redis_node(settings: Settings, node: RedisNode) -> int:
    node.dir.mkdir(parents=True, exist_ok=True)
    cmd = [shutil.which("redis-server") or "redis-server"]
    port_flag = "--port"
    if settings.stack.secure:
        # TLS on the client port, the bus and replication; ACL users. Kept off argv.
        conf = node.dir / "secure.conf"
        write_private(conf, redis_config(settings, node.port, cluster=True))
        cmd.append(str(conf))
        port_flag = "--tls-port"
    elif settings.redis.password:
        # Clients and the replicas (masterauth) both need the password; kept off argv.
        conf = node.dir / "auth.conf"
        secret = settings.redis.password.get_secret_value()
        write_private(conf, f'requirepass "{secret}"\nmasterauth "{secret}"\n')
        cmd.append(str(conf))
    cmd += [
        port_flag,
        str(node.port),
        "--bind",
        "127.0.0.1",
        "--dir",
        str(node.dir),
        "--cluster-enabled",
        "yes",
        "--cluster-config-file",
        "nodes.conf",
        # The bus port defaults to port + 10000: 40701 for the test stack's first node, in
        # Linux's ephemeral range (32768-60999), where a client's outgoing connection took it
        # once and the node could not start. Next to the node instead.
        "--cluster-port",
        str(node.bus_port),
        "--cluster-node-timeout",
        "5000",
        *REDIS_SERVER_FLAGS,
    ]
    return spawn(settings, node.name, cmd, node.dir, node.log)


def _create_redis_cluster(settings: Settings) -> None:
    """Assign the slots (``redis-cli --cluster create``) unless the nodes already form the
    cluster (restarted nodes rejoin from their nodes.conf)."""
    nodes = redis_nodes(settings)
    deadline = time.monotonic() + START_TIMEOUT_S["redis"]
    while time.monotonic() < deadline and not all(cluster_info(settings, n.port) for n in nodes):
        time.sleep(0.1)
    first = cluster_info(settings, nodes[0].port)
    if first.get("cluster_known_nodes", "1") != "1" or first.get("cluster_slots_assigned") != "0":
        return
    cli = shutil.which("redis-cli")
    if cli is None:
        raise StackError(
            "redis-cli not found (needed to create the Redis Cluster): run `make bootstrap` or "
            "`apt-get install redis-tools`"
        )
    cli_args, cli_env = redis_cli_args(settings)
    proc = subprocess.run(
        [
            cli,
            *cli_args,
            "--cluster",
            "create",
            *(f"127.0.0.1:{n.port}" for n in nodes),
            "--cluster-replicas",
            "1",
            "--cluster-yes",
        ],
        capture_output=True,
        text=True,
        env=cli_env,
        timeout=60,
        check=False,
    )
    if proc.returncode != 0:
        tail = " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-3:])
        raise StackError(f"redis-cli --cluster create failed: {tail}")
    logger.info("created Redis Cluster on ports %s", [n.port for n in nodes])


def up_cluster(settings: Settings, comp: Component) -> bool:
    """Start every node of ``comp``'s cluster that is not running and wait until the cluster
    is healthy. Returns whether any node was started here; if the cluster does not come up,
    the nodes this call started are stopped again."""
    started: list[tuple[str, int]] = []
    try:
        return _start_cluster_nodes(settings, comp, started)
    except BaseException:
        if started:
            logger.error("%s cluster did not come up; stopping %s", comp, [n for n, _ in started])
            for _, pid in started:
                terminate(pid)
            for name, pid in started:
                stop_process(settings, comp, pid)
                pid_file(settings, name).unlink(missing_ok=True)
        raise


def _start_cluster_nodes(
    settings: Settings, comp: Component, started: list[tuple[str, int]]
) -> bool:
    run_dir(settings).mkdir(parents=True, exist_ok=True)
    if comp == "kafka":
        knodes = kafka_nodes(settings)
        libs = ensure_kafka(settings)
        cluster_id = _cluster_id(settings)
        pids: list[tuple[str, Path, int | None]] = []
        for kn in knodes:
            pid = owned_node_pid(settings, kn.name, partial(kafka_node_owns, kn))
            if pid is None:
                for port in (kn.port, kn.controller_port):
                    if port_open(port):
                        raise StackError(
                            f"port {port} ({kn.name}) is in use by something that is not ours: "
                            "stop it or choose other ports (RTPIPE_STACK__KAFKA_PORT)"
                        )
                pid = _start_kafka_node(settings, libs, kn, cluster_id)
                started.append((kn.name, pid))
            pids.append((kn.name, kn.log, pid))
        health: Callable[[Settings], bool] = kafka_cluster_healthy
    else:
        rnodes = redis_nodes(settings)
        pids = []
        for rn in rnodes:
            pid = owned_node_pid(settings, rn.name, partial(redis_node_owns, rn))
            if pid is None:
                if port_open(rn.port):
                    raise StackError(
                        f"port {rn.port} ({rn.name}) is in use by something that is not ours: "
                        "stop it or choose other ports (RTPIPE_STACK__REDIS_PORT)"
                    )
                pid = _start_redis_node(settings, rn)
                started.append((rn.name, pid))
            pids.append((rn.name, rn.log, pid))
        _create_redis_cluster(settings)
        health = redis_cluster_healthy
    deadline = time.monotonic() + START_TIMEOUT_S[comp] * (2 if comp == "kafka" else 1)
    while time.monotonic() < deadline:
        if health(settings):
            logger.info("%s cluster healthy (%d nodes)", comp, len(pids))
            return bool(started)
        dead = [(name, log) for name, log, pid in pids if pid is not None and not alive(pid)]
        if dead:
            name, log = dead[0]
            raise StackError(f"{name} exited after start; see {log}: {log_tail(log)}")
        time.sleep(0.25)
    raise StackError(
        f"{comp} cluster is not healthy after start; see the logs under {run_dir(settings)}"
    )


def _cluster_node_pids(settings: Settings, comp: Component) -> list[tuple[str, int]]:
    """Our live processes among ``comp``'s cluster nodes, from the PID files in the run dir
    (whatever the settings say now, so ``down`` stops what an earlier ``up`` started)."""
    run = run_dir(settings)
    out: list[tuple[str, int]] = []
    for path in sorted(run.glob(f"{comp}-*.pid")):
        name = path.stem
        suffix = name.split("-", 1)[1]
        if not suffix.isdigit():
            continue
        owns: Callable[[int], bool]
        if comp == "kafka":
            kn = KafkaNode(int(suffix), 0, 0, run / name, run / f"{name}-data")
            owns = partial(kafka_node_owns, kn)
        else:
            rn = RedisNode(int(suffix), run / name)
            owns = partial(redis_node_owns, rn)
        pid = owned_node_pid(settings, name, owns)
        if pid is not None:
            out.append((name, pid))
    return out


def down_cluster(settings: Settings, comp: Component) -> bool:
    """Stop our nodes of ``comp``'s cluster; returns whether there were any."""
    nodes = _cluster_node_pids(settings, comp)
    # Signal every node first, then wait: a quorum stopping one by one would elect anew and
    # wait for the nodes already gone at each step.
    for _, pid in nodes:
        terminate(pid)
    for name, pid in nodes:
        stop_process(settings, comp, pid)
        pid_file(settings, name).unlink(missing_ok=True)
    return bool(nodes)


def cluster_status(settings: Settings, comp: Component) -> list[ComponentStatus]:
    """One status per node of ``comp``'s cluster, each healthy when the cluster is."""
    healthy = (kafka_cluster_healthy if comp == "kafka" else redis_cluster_healthy)(settings)
    out: list[ComponentStatus] = []
    if comp == "kafka":
        for kn in kafka_nodes(settings):
            pid = owned_node_pid(settings, kn.name, partial(kafka_node_owns, kn))
            out.append(ComponentStatus(kn.name, pid is not None, pid, kn.port, healthy, kn.log))
    else:
        for rn in redis_nodes(settings):
            pid = owned_node_pid(settings, rn.name, partial(redis_node_owns, rn))
            out.append(ComponentStatus(rn.name, pid is not None, pid, rn.port, healthy, rn.log))
    return out

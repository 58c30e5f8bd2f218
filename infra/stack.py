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

``up`` is idempotent: a component that already answers its health check on its port is left
alone and is not reported as started, so a caller stops only what it started (``down(only=...)``).
``down`` kills a process only if its PID file is ours and ``/proc/PID`` still shows the command
we launched, so a recycled PID is never killed.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Literal, cast, get_args

from stages.shared.errors import RtpipeError
from stages.shared.settings import Settings
from stages.shared.topology import STAGES

if TYPE_CHECKING:
    import redis

logger = logging.getLogger(__name__)

Component = Literal["kafka", "redis", "prometheus"]
COMPONENTS: tuple[Component, ...] = get_args(Component)

# Rule files Prometheus loads; shipped in the package next to this module.
ALERTS_FILE = Path(__file__).resolve().parent / "prometheus" / "alerts.yml"

_KAFKA_MARKER = ".complete"
_LOG4J_VERSION = "2.24.3"  # what kafka_2.13 4.1.1 pulls in; the slf4j binding must match
_START_TIMEOUT_S: dict[Component, float] = {"kafka": 90.0, "redis": 20.0, "prometheus": 30.0}
_STOP_TIMEOUT_S: dict[Component, float] = {"kafka": 30.0, "redis": 10.0, "prometheus": 10.0}

# Children started by this interpreter, so they are reaped (no zombies, no ResourceWarning).
_children: dict[int, subprocess.Popen[bytes]] = {}


class StackError(RtpipeError, RuntimeError):
    """A component cannot be prepared, started, checked or stopped; the message says why."""


@dataclass(frozen=True)
class ComponentStatus:
    """What ``status`` knows about one component.

    Attributes:
        name: Component name (``kafka-2``, ``redis-33701``: one node of a cluster stack).
        running: A process we started (PID file, matching command line) is alive.
        pid: That process id, if running.
        port: The port the component serves on.
        healthy: The health check on ``port`` passes (whoever serves it).
        log: Where the component logs.
    """

    name: str
    running: bool
    pid: int | None
    port: int
    healthy: bool
    log: Path


# --------------------------------------------------------------------------- preflight


_INSTALL_HINT: dict[str, str] = {
    "java": "openjdk-17-jre-headless",
    "mvn": "maven",
    "redis-server": "redis-server",
    "prometheus": "prometheus",
}


def _binaries(component: Component, *, need_maven: bool = True) -> list[str]:
    if component == "kafka":
        return ["java", "mvn"] if need_maven else ["java"]
    if component == "redis":
        return ["redis-server"]
    return ["prometheus"]


def preflight(components: Iterable[str], settings: Settings | None = None) -> None:
    """Fail fast when a binary a component needs is missing.

    Args:
        components: Component names to check (``kafka``, ``redis``, ``prometheus``).
        settings: When given and Kafka's jars are already cached, ``mvn`` is not required.

    Raises:
        StackError: A component name is unknown or a binary is not on ``PATH``; the message
            names what to install.
    """
    comps = _validate(components)
    need_maven = settings is None or not _kafka_complete(_kafka_home(settings))
    for comp in comps:
        for binary in _binaries(comp, need_maven=need_maven):
            if shutil.which(binary) is None:
                raise StackError(
                    f"{binary} not found (needed by {comp}): run `make bootstrap` or "
                    f"`apt-get install {_INSTALL_HINT[binary]}`"
                )


def _validate(components: Iterable[str]) -> list[Component]:
    out: list[Component] = []
    for name in components:
        if name not in COMPONENTS:
            raise StackError(f"unknown component {name!r}: expected one of {', '.join(COMPONENTS)}")
        if name not in out:
            out.append(name)
    # Always in dependency order, whatever order the caller gave.
    return [c for c in COMPONENTS if c in out]


# --------------------------------------------------------------------------- kafka jars


def _kafka_home(settings: Settings) -> Path:
    return (settings.stack.cache_dir / f"kafka-{settings.stack.kafka_version}").resolve()


def _kafka_complete(home: Path) -> bool:
    return (home / _KAFKA_MARKER).is_file() and any((home / "libs").glob("kafka_2.13-*.jar"))


def _kafka_pom(version: str) -> str:
    return f"""<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>rtpipe</groupId>
  <artifactId>kafka-dist</artifactId>
  <version>{version}</version>
  <packaging>pom</packaging>
  <dependencies>
    <!-- The broker itself (KRaft included); kafka-tools is left out: it pulls connect-runtime. -->
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_2.13</artifactId>
      <version>{version}</version>
    </dependency>
    <!-- Kafka logs through slf4j 1.7; without a binding it logs nothing at all. -->
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-slf4j-impl</artifactId>
      <version>{_LOG4J_VERSION}</version>
    </dependency>
  </dependencies>
</project>
"""


def ensure_kafka(settings: Settings) -> Path:
    """Resolve Kafka's jars from Maven Central into the shared cache, once.

    The jars land in ``cache_dir/kafka-VERSION/libs``; a marker file is written only after a
    complete download, so an interrupted run is simply redone. Concurrent callers serialise on
    a lock file.

    Args:
        settings: Provides ``stack.cache_dir`` and ``stack.kafka_version``.

    Returns:
        The directory holding every jar of the broker's runtime class path.

    Raises:
        StackError: ``mvn`` is missing or the resolution fails (the message has Maven's tail).
    """
    home = _kafka_home(settings)
    libs = home / "libs"
    if _kafka_complete(home):
        return libs
    home.mkdir(parents=True, exist_ok=True)
    with open(home / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _kafka_complete(home):  # another process finished while we waited
            return libs
        mvn = shutil.which("mvn")
        if mvn is None:
            raise StackError(
                "mvn not found (needed to fetch Kafka): run `make bootstrap` or "
                "`apt-get install maven`"
            )
        version = settings.stack.kafka_version
        (home / "pom.xml").write_text(_kafka_pom(version))
        staging = home / "libs.partial"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(libs, ignore_errors=True)
        logger.info("resolving Kafka %s jars from Maven Central into %s", version, libs)
        proc = subprocess.run(
            [
                mvn,
                "-q",
                "-B",
                "-f",
                str(home / "pom.xml"),
                "dependency:copy-dependencies",
                f"-DoutputDirectory={staging}",
                "-DincludeScope=runtime",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
            raise StackError(f"mvn could not resolve Kafka {version}: {' | '.join(tail)}")
        staging.rename(libs)
        (home / _KAFKA_MARKER).write_text(f"kafka_2.13 {version}\n")
    return libs


# --------------------------------------------------------------------------- paths


def _run_dir(settings: Settings) -> Path:
    return settings.run_dir.resolve()


def _pid_file(settings: Settings, comp: str) -> Path:
    return _run_dir(settings) / f"{comp}.pid"


def _log_file(settings: Settings, comp: str) -> Path:
    return _run_dir(settings) / f"{comp}.log"


def _port(settings: Settings, comp: Component) -> int:
    return {
        "kafka": settings.stack.kafka_port,
        "redis": settings.stack.redis_port,
        "prometheus": settings.stack.prometheus_port,
    }[comp]


def _kafka_properties_file(settings: Settings) -> Path:
    return _run_dir(settings) / "kafka" / "server.properties"


def _prometheus_config_file(settings: Settings) -> Path:
    return _run_dir(settings) / "prometheus" / "prometheus.yml"


def _redis_dir(settings: Settings) -> Path:
    return _run_dir(settings) / "redis"


# --------------------------------------------------------------------------- process checks


def _reap(pid: int) -> None:
    child = _children.get(pid)
    if child is not None and child.poll() is not None:
        del _children[pid]
        return
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _alive(pid: int) -> bool:
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
        return "kafka.Kafka" in cmd and str(_kafka_properties_file(settings)) in cmd
    if comp == "prometheus":
        return "prometheus" in cmd and f"--config.file={_prometheus_config_file(settings)}" in cmd
    # redis-server rewrites its process title, so the command line keeps only the binary and
    # address; its working directory (``--dir``) identifies the run dir.
    try:
        cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
    except OSError:
        return False
    return "redis-server" in cmd and cwd == _redis_dir(settings)


def _read_pid(settings: Settings, comp: str) -> int | None:
    try:
        return int(_pid_file(settings, comp).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _owned_pid(settings: Settings, comp: Component) -> int | None:
    """PID of our live process for ``comp``, or None (stale PID files are removed)."""
    pid = _read_pid(settings, comp)
    if pid is None:
        return None
    if _alive(pid) and _owns(settings, comp, pid):
        return pid
    logger.info("removing stale %s PID file (pid %d is not ours any more)", comp, pid)
    _pid_file(settings, comp).unlink(missing_ok=True)
    return None


def _port_open(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------- health checks


def _kafka_healthy(settings: Settings) -> bool:
    port = settings.stack.kafka_port
    # A TCP probe first: librdkafka would log connection errors for a closed port.
    if not _port_open(port):
        return False
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": f"127.0.0.1:{port}", "log_level": 0})
    try:
        meta = admin.list_topics(timeout=3)
    except KafkaException:
        return False
    return bool(meta.brokers) and meta.controller_id is not None and meta.controller_id >= 0


def _redis_probe(settings: Settings, port: int) -> redis.Redis:
    """A client of the local node on ``port`` for one health question (2 s timeouts)."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    password = settings.redis.password.get_secret_value() if settings.redis.password else None
    return redis.Redis(
        host="127.0.0.1",
        port=port,
        password=password,
        socket_timeout=2,
        socket_connect_timeout=2,
        # A probe answers once: redis-py's default retries turn one timeout into twelve seconds.
        retry=Retry(NoBackoff(), 0),
    )


def _redis_healthy(settings: Settings) -> bool:
    port = settings.stack.redis_port
    if not _port_open(port):
        return False
    import redis

    client = _redis_probe(settings, port)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def _prometheus_healthy(settings: Settings) -> bool:
    port = settings.stack.prometheus_port
    if not _port_open(port):
        return False
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2) as resp:
            return int(resp.status) == 200
    except (urllib.error.URLError, OSError):
        return False


_HEALTH: dict[Component, Callable[[Settings], bool]] = {
    "kafka": _kafka_healthy,
    "redis": _redis_healthy,
    "prometheus": _prometheus_healthy,
}


# --------------------------------------------------------------------------- configs


def _write_kafka_config(settings: Settings, node: KafkaNode | None = None) -> Path:
    """The broker's server.properties (and log4j2 file): the single node, or ``node`` of the
    cluster stack."""
    run = _run_dir(settings)
    st = settings.stack
    if node is None:
        conf_dir, data = run / "kafka", run / "kafka-data"
        node_id, port, controller_port = 1, st.kafka_port, st.kafka_controller_port
        voters = f"1@127.0.0.1:{st.kafka_controller_port}"
        log = _log_file(settings, "kafka")
        # Single node: internal topics cannot have more than one replica.
        replication = [
            "offsets.topic.replication.factor=1",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            "share.coordinator.state.topic.replication.factor=1",
            "share.coordinator.state.topic.min.isr=1",
        ]
    else:
        conf_dir, data = node.conf_dir, node.data_dir
        node_id, port, controller_port = node.node_id, node.port, node.controller_port
        voters = ",".join(
            f"{n.node_id}@127.0.0.1:{n.controller_port}" for n in kafka_nodes(settings)
        )
        log = node.log
        rf = min(3, st.kafka_brokers)
        isr = max(1, rf - 1)
        # Every internal topic on three brokers, writes acknowledged by two: one broker can
        # be lost (or restarted) without losing a committed offset or transaction marker.
        replication = [
            f"offsets.topic.replication.factor={rf}",
            f"transaction.state.log.replication.factor={rf}",
            f"transaction.state.log.min.isr={isr}",
            f"share.coordinator.state.topic.replication.factor={rf}",
            f"share.coordinator.state.topic.min.isr={isr}",
            f"default.replication.factor={rf}",
            f"min.insync.replicas={isr}",
        ]
    conf_dir.mkdir(parents=True, exist_ok=True)
    data.mkdir(parents=True, exist_ok=True)
    props = conf_dir / "server.properties"
    props.write_text(
        "\n".join(
            [
                "# Written by infra/stack.py on every start; edit the code, not this file.",
                "process.roles=broker,controller",
                f"node.id={node_id}",
                f"controller.quorum.voters={voters}",
                f"listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
                f"advertised.listeners=PLAINTEXT://127.0.0.1:{port}",
                "controller.listener.names=CONTROLLER",
                "inter.broker.listener.name=PLAINTEXT",
                "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
                f"log.dirs={data}",
                f"num.partitions={settings.topics.partitions}",
                *replication,
                # Consumers of a fresh group start at once instead of waiting 3 s.
                "group.initial.rebalance.delay.ms=0",
                "",
            ]
        )
    )
    (conf_dir / "log4j2.properties").write_text(
        "\n".join(
            [
                "status = warn",
                "appender.file.type = RollingFile",
                "appender.file.name = file",
                f"appender.file.fileName = {log}",
                f"appender.file.filePattern = {log}.%i",
                "appender.file.layout.type = PatternLayout",
                "appender.file.layout.pattern = [%d] %p %m (%c)%n",
                "appender.file.policies.type = Policies",
                "appender.file.policies.size.type = SizeBasedTriggeringPolicy",
                "appender.file.policies.size.size = 50MB",
                "appender.file.strategy.type = DefaultRolloverStrategy",
                "appender.file.strategy.max = 3",
                "rootLogger.level = INFO",
                "rootLogger.appenderRef.file.ref = file",
                # Per-request and state-change chatter drowns out what matters.
                "logger.request.name = kafka.request.logger",
                "logger.request.level = WARN",
                "logger.state.name = state.change.logger",
                "logger.state.level = WARN",
                "",
            ]
        )
    )
    return props


def _kafka_java(
    settings: Settings, libs: Path, main: str, *args: str, conf_dir: Path | None = None
) -> list[str]:
    java = shutil.which("java") or "java"
    log4j = (conf_dir or _kafka_properties_file(settings).parent) / "log4j2.properties"
    return [
        java,
        f"-Xmx{settings.stack.kafka_heap}",
        "-XX:+UseG1GC",
        "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={log4j}",
        "-cp",
        f"{libs}/*",
        main,
        *args,
    ]


def _random_cluster_id() -> str:
    """What ``StorageTool random-uuid`` prints, without a second JVM start (~2 s)."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        # Kafka's own generator rejects ids starting with "-": they read as CLI flags.
        if not cid.startswith("-"):
            return cid


def _format_kafka_storage(settings: Settings, libs: Path, props: Path) -> None:
    data = _run_dir(settings) / "kafka-data"
    if (data / "meta.properties").is_file():
        return
    cluster_id = _random_cluster_id()
    fmt = subprocess.run(
        _kafka_java(
            settings, libs, "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(props)
        ),
        capture_output=True,
        text=True,
        check=False,
    )
    if fmt.returncode != 0:
        raise StackError(f"kafka storage format failed: {(fmt.stdout + fmt.stderr).strip()[-300:]}")
    logger.info("formatted Kafka storage %s (cluster %s)", data, cluster_id)


def _write_prometheus_config(settings: Settings) -> Path:
    conf = _prometheus_config_file(settings)
    conf.parent.mkdir(parents=True, exist_ok=True)
    (conf.parent / "data").mkdir(exist_ok=True)
    host = settings.metrics.host
    # A stage bound to every interface is still scraped over loopback.
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    lines = [
        "# Written by infra/stack.py on every start; edit the code, not this file.",
        "global:",
        "  scrape_interval: 5s",
        "  evaluation_interval: 15s",
        "rule_files:",
        f"  - {ALERTS_FILE}",
        "scrape_configs:",
    ]
    for stage in STAGES:
        lines += [
            f"  - job_name: {stage}",
            "    static_configs:",
            "      - targets: ["
            + ", ".join(f"'{host}:{port}'" for port in settings.metrics.ports(stage))
            + "]",
        ]
    conf.write_text("\n".join(lines) + "\n")
    return conf


# --------------------------------------------------------------------------- start / stop


def _spawn(settings: Settings, comp: str, cmd: Sequence[str], cwd: Path, log: Path) -> int:
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
    _pid_file(settings, comp).write_text(f"{proc.pid}\n")
    logger.info("started %s (pid %d), log %s", comp, proc.pid, log)
    return proc.pid


def _start(settings: Settings, comp: Component) -> int:
    run = _run_dir(settings)
    run.mkdir(parents=True, exist_ok=True)
    if comp == "kafka":
        libs = ensure_kafka(settings)
        props = _write_kafka_config(settings)
        _format_kafka_storage(settings, libs, props)
        cmd = _kafka_java(settings, libs, "kafka.Kafka", str(props))
        return _spawn(settings, comp, cmd, run / "kafka", run / "kafka.console.log")
    if comp == "redis":
        rdir = _redis_dir(settings)
        rdir.mkdir(parents=True, exist_ok=True)
        cmd = [shutil.which("redis-server") or "redis-server"]
        if settings.redis.password:
            # The password goes in a private config file, not on the visible command line.
            conf = rdir / "auth.conf"
            conf.touch(mode=0o600)
            conf.chmod(0o600)
            conf.write_text(f'requirepass "{settings.redis.password.get_secret_value()}"\n')
            cmd.append(str(conf))
        cmd += [
            "--port",
            str(settings.stack.redis_port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(rdir),
            "--appendonly",
            "yes",
            "--daemonize",
            "no",
            "--logfile",
            "",
        ]
        return _spawn(settings, comp, cmd, rdir, _log_file(settings, comp))
    conf = _write_prometheus_config(settings)
    cmd = [
        shutil.which("prometheus") or "prometheus",
        f"--config.file={conf}",
        f"--storage.tsdb.path={conf.parent / 'data'}",
        "--storage.tsdb.retention.time=7d",
        f"--web.listen-address=127.0.0.1:{settings.stack.prometheus_port}",
    ]
    return _spawn(settings, comp, cmd, conf.parent, _log_file(settings, comp))


def _tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


def _wait_healthy(settings: Settings, comp: Component, pid: int | None) -> None:
    deadline = time.monotonic() + _START_TIMEOUT_S[comp]
    while time.monotonic() < deadline:
        if _HEALTH[comp](settings):
            logger.info("%s healthy on port %d", comp, _port(settings, comp))
            return
        if pid is not None and not _alive(pid):
            break
        time.sleep(0.25)
    log = _log_file(settings, comp)
    tail = _tail(log)
    if comp == "kafka":
        # JVM-level failures (bad heap, class path) never reach log4j's file.
        console = _run_dir(settings) / "kafka.console.log"
        tail = " | ".join(t for t in (_tail(console, 3), tail) if t)
        log = console if not log.exists() else log
    state = "exited" if pid is not None and not _alive(pid) else "is not healthy"
    raise StackError(
        f"{comp} {state} after start (port {_port(settings, comp)}); see {log}: {tail}"
    )


def _stop(settings: Settings, comp: str, pid: int, timeout: float | None = None) -> None:
    if timeout is None:
        timeout = _STOP_TIMEOUT_S[cast(Component, comp)]
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
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.1)
    if _alive(pid):
        logger.warning("%s (pid %d) ignored SIGTERM for %.0fs; sending SIGKILL", comp, pid, timeout)
        with contextlib.suppress(ProcessLookupError):
            kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.1)
    logger.info("stopped %s (pid %d)", comp, pid)


# --------------------------------------------------------------------------- cluster stack
#
# ``stack.kafka_brokers > 1``: a KRaft quorum of combined broker/controller nodes, one JVM each,
# sharing one cluster id (``run/kafka-cluster.id``), each with its own node id, ports, config
# (``run/kafka-N/``), data (``run/kafka-N-data/``), PID file and log (``run/kafka-N.*``).
# ``stack.redis_cluster``: a Redis Cluster of ``redis_cluster_masters`` masters and one replica
# each, one redis-server per port with its own dir (``run/redis-PORT/``: nodes.conf, AOF).
# ``up``/``down`` still speak of the components ``kafka`` and ``redis`` (all their nodes);
# ``status`` reports every node.


@dataclass(frozen=True)
class KafkaNode:
    """One broker/controller of the cluster stack."""

    node_id: int
    port: int
    controller_port: int
    conf_dir: Path
    data_dir: Path

    @property
    def name(self) -> str:
        return f"kafka-{self.node_id}"

    @property
    def log(self) -> Path:
        return self.conf_dir.parent / f"{self.name}.log"

    @property
    def console_log(self) -> Path:
        return self.conf_dir.parent / f"{self.name}.console.log"


@dataclass(frozen=True)
class RedisNode:
    """One redis-server of the Redis Cluster stack."""

    port: int
    dir: Path

    @property
    def name(self) -> str:
        return f"redis-{self.port}"

    @property
    def bus_port(self) -> int:
        """The cluster bus (node-to-node) port: next to the node's own for a new node, what
        its ``nodes.conf`` records for one that has run before (its peers know it there)."""
        try:
            text = (self.dir / "nodes.conf").read_text()
        except OSError:
            return self.port + 100
        for line in text.splitlines():
            fields = line.split()
            if len(fields) > 2 and "myself" in fields[2].split(","):
                address = fields[1].split(",")[0]  # ip:port@cport[,hostname]
                if "@" in address:
                    return int(address.rsplit("@", 1)[1])
        return self.port + 100

    @property
    def log(self) -> Path:
        return self.dir.parent / f"{self.name}.log"


def kafka_clustered(settings: Settings) -> bool:
    """Whether ``settings`` ask for the Kafka cluster stack."""
    return settings.stack.kafka_brokers > 1


def redis_clustered(settings: Settings) -> bool:
    """Whether ``settings`` ask for the Redis Cluster stack."""
    return settings.stack.redis_cluster


def kafka_nodes(settings: Settings) -> list[KafkaNode]:
    """The Kafka nodes of the cluster stack, node ids 1..N."""
    st = settings.stack
    run = _run_dir(settings)
    return [
        KafkaNode(
            node_id=i + 1,
            port=st.kafka_port + i * st.node_port_step,
            controller_port=st.kafka_controller_port + i * st.node_port_step,
            conf_dir=run / f"kafka-{i + 1}",
            data_dir=run / f"kafka-{i + 1}-data",
        )
        for i in range(st.kafka_brokers)
    ]


def redis_nodes(settings: Settings) -> list[RedisNode]:
    """The Redis Cluster nodes: masters first (``redis-cli --cluster create`` order)."""
    st = settings.stack
    run = _run_dir(settings)
    return [
        RedisNode(port=st.redis_port + i, dir=run / f"redis-{st.redis_port + i}")
        for i in range(2 * st.redis_cluster_masters)
    ]


def _kafka_node_owns(node: KafkaNode, pid: int) -> bool:
    cmd = _cmdline(pid)
    return "kafka.Kafka" in cmd and str(node.conf_dir / "server.properties") in cmd


def _redis_node_owns(node: RedisNode, pid: int) -> bool:
    try:
        cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
    except OSError:
        return False
    return "redis-server" in _cmdline(pid) and cwd == node.dir


def _owned_node_pid(settings: Settings, name: str, owns: Callable[[int], bool]) -> int | None:
    pid = _read_pid(settings, name)
    if pid is None:
        return None
    if _alive(pid) and owns(pid):
        return pid
    logger.info("removing stale %s PID file (pid %d is not ours any more)", name, pid)
    _pid_file(settings, name).unlink(missing_ok=True)
    return None


def _kafka_cluster_healthy(settings: Settings) -> bool:
    nodes = kafka_nodes(settings)
    open_ports = [n.port for n in nodes if _port_open(n.port)]
    if len(open_ports) < len(nodes):
        return False
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    admin = AdminClient(
        {"bootstrap.servers": ",".join(f"127.0.0.1:{p}" for p in open_ports), "log_level": 0}
    )
    try:
        meta = admin.list_topics(timeout=3)
    except KafkaException:
        return False
    return (
        len(meta.brokers) == len(nodes)
        and meta.controller_id is not None
        and meta.controller_id >= 0
    )


def _redis_cli_env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    if settings.redis.password:
        # redis-cli reads the password from here, off the visible command line.
        env["REDISCLI_AUTH"] = settings.redis.password.get_secret_value()
    return env


def _cluster_info(settings: Settings, port: int) -> dict[str, str]:
    """``CLUSTER INFO`` of the node on ``port`` as a dict (empty if it does not answer)."""
    if not _port_open(port):
        return {}
    import redis

    client = _redis_probe(settings, port)
    try:
        raw = client.execute_command("CLUSTER", "INFO")
    except redis.RedisError:
        return {}
    finally:
        client.close()
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {k.strip(): v.strip() for k, v in pairs}


def _redis_cluster_healthy(settings: Settings) -> bool:
    nodes = redis_nodes(settings)
    for node in nodes:
        info = _cluster_info(settings, node.port)
        if info.get("cluster_state") != "ok" or info.get("cluster_known_nodes") != str(len(nodes)):
            return False
    return True


def _start_kafka_node(settings: Settings, libs: Path, node: KafkaNode, cluster_id: str) -> int:
    props = _write_kafka_config(settings, node)
    if not (node.data_dir / "meta.properties").is_file():
        fmt = subprocess.run(
            _kafka_java(
                settings,
                libs,
                "kafka.tools.StorageTool",
                "format",
                "-t",
                cluster_id,
                "-c",
                str(props),
                conf_dir=node.conf_dir,
            ),
            capture_output=True,
            text=True,
            check=False,
        )
        if fmt.returncode != 0:
            detail = (fmt.stdout + fmt.stderr).strip()[-300:]
            raise StackError(f"kafka storage format of {node.name} failed: {detail}")
    cmd = _kafka_java(settings, libs, "kafka.Kafka", str(props), conf_dir=node.conf_dir)
    return _spawn(settings, node.name, cmd, node.conf_dir, node.console_log)


def _cluster_id(settings: Settings) -> str:
    """The Kafka cluster stack's id, made once and kept with its data."""
    path = _run_dir(settings) / "kafka-cluster.id"
    if path.is_file():
        return path.read_text().strip()
    cid = _random_cluster_id()
    path.write_text(cid + "\n")
    return cid


def _start_redis_node(settings: Settings, node: RedisNode) -> int:
    node.dir.mkdir(parents=True, exist_ok=True)
    cmd = [shutil.which("redis-server") or "redis-server"]
    if settings.redis.password:
        # Clients and the replicas (masterauth) both need the password; kept off argv.
        conf = node.dir / "auth.conf"
        conf.touch(mode=0o600)
        conf.chmod(0o600)
        secret = settings.redis.password.get_secret_value()
        conf.write_text(f'requirepass "{secret}"\nmasterauth "{secret}"\n')
        cmd.append(str(conf))
    cmd += [
        "--port",
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
        "--appendonly",
        "yes",
        "--daemonize",
        "no",
        "--logfile",
        "",
    ]
    return _spawn(settings, node.name, cmd, node.dir, node.log)


def _create_redis_cluster(settings: Settings) -> None:
    """Assign the slots (``redis-cli --cluster create``) unless the nodes already form the
    cluster (restarted nodes rejoin from their nodes.conf)."""
    nodes = redis_nodes(settings)
    deadline = time.monotonic() + _START_TIMEOUT_S["redis"]
    while time.monotonic() < deadline and not all(_cluster_info(settings, n.port) for n in nodes):
        time.sleep(0.1)
    first = _cluster_info(settings, nodes[0].port)
    if first.get("cluster_known_nodes", "1") != "1" or first.get("cluster_slots_assigned") != "0":
        return
    cli = shutil.which("redis-cli")
    if cli is None:
        raise StackError(
            "redis-cli not found (needed to create the Redis Cluster): run `make bootstrap` or "
            "`apt-get install redis-tools`"
        )
    proc = subprocess.run(
        [
            cli,
            "--cluster",
            "create",
            *(f"127.0.0.1:{n.port}" for n in nodes),
            "--cluster-replicas",
            "1",
            "--cluster-yes",
        ],
        capture_output=True,
        text=True,
        env=_redis_cli_env(settings),
        timeout=60,
        check=False,
    )
    if proc.returncode != 0:
        tail = " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-3:])
        raise StackError(f"redis-cli --cluster create failed: {tail}")
    logger.info("created Redis Cluster on ports %s", [n.port for n in nodes])


def _up_cluster(settings: Settings, comp: Component) -> bool:
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
                _terminate(pid)
            for name, pid in started:
                _stop(settings, comp, pid)
                _pid_file(settings, name).unlink(missing_ok=True)
        raise


def _start_cluster_nodes(
    settings: Settings, comp: Component, started: list[tuple[str, int]]
) -> bool:
    _run_dir(settings).mkdir(parents=True, exist_ok=True)
    if comp == "kafka":
        knodes = kafka_nodes(settings)
        libs = ensure_kafka(settings)
        cluster_id = _cluster_id(settings)
        pids: list[tuple[str, Path, int | None]] = []
        for kn in knodes:
            pid = _owned_node_pid(settings, kn.name, partial(_kafka_node_owns, kn))
            if pid is None:
                for port in (kn.port, kn.controller_port):
                    if _port_open(port):
                        raise StackError(
                            f"port {port} ({kn.name}) is in use by something that is not ours: "
                            "stop it or choose other ports (RTPIPE_STACK__KAFKA_PORT)"
                        )
                pid = _start_kafka_node(settings, libs, kn, cluster_id)
                started.append((kn.name, pid))
            pids.append((kn.name, kn.log, pid))
        health: Callable[[Settings], bool] = _kafka_cluster_healthy
    else:
        rnodes = redis_nodes(settings)
        pids = []
        for rn in rnodes:
            pid = _owned_node_pid(settings, rn.name, partial(_redis_node_owns, rn))
            if pid is None:
                if _port_open(rn.port):
                    raise StackError(
                        f"port {rn.port} ({rn.name}) is in use by something that is not ours: "
                        "stop it or choose other ports (RTPIPE_STACK__REDIS_PORT)"
                    )
                pid = _start_redis_node(settings, rn)
                started.append((rn.name, pid))
            pids.append((rn.name, rn.log, pid))
        _create_redis_cluster(settings)
        health = _redis_cluster_healthy
    deadline = time.monotonic() + _START_TIMEOUT_S[comp] * (2 if comp == "kafka" else 1)
    while time.monotonic() < deadline:
        if health(settings):
            logger.info("%s cluster healthy (%d nodes)", comp, len(pids))
            return bool(started)
        dead = [(name, log) for name, log, pid in pids if pid is not None and not _alive(pid)]
        if dead:
            name, log = dead[0]
            raise StackError(f"{name} exited after start; see {log}: {_tail(log)}")
        time.sleep(0.25)
    raise StackError(
        f"{comp} cluster is not healthy after start; see the logs under {_run_dir(settings)}"
    )


def _cluster_node_pids(settings: Settings, comp: Component) -> list[tuple[str, int]]:
    """Our live processes among ``comp``'s cluster nodes, from the PID files in the run dir
    (whatever the settings say now, so ``down`` stops what an earlier ``up`` started)."""
    run = _run_dir(settings)
    out: list[tuple[str, int]] = []
    for pid_file in sorted(run.glob(f"{comp}-*.pid")):
        name = pid_file.stem
        suffix = name.split("-", 1)[1]
        if not suffix.isdigit():
            continue
        owns: Callable[[int], bool]
        if comp == "kafka":
            kn = KafkaNode(int(suffix), 0, 0, run / name, run / f"{name}-data")
            owns = partial(_kafka_node_owns, kn)
        else:
            rn = RedisNode(int(suffix), run / name)
            owns = partial(_redis_node_owns, rn)
        pid = _owned_node_pid(settings, name, owns)
        if pid is not None:
            out.append((name, pid))
    return out


def _terminate(pid: int) -> None:
    try:
        group = os.getpgid(pid) == pid
    except ProcessLookupError:
        return
    with contextlib.suppress(ProcessLookupError):
        (os.killpg if group else os.kill)(pid, signal.SIGTERM)


def _down_cluster(settings: Settings, comp: Component) -> bool:
    nodes = _cluster_node_pids(settings, comp)
    # Signal every node first, then wait: a quorum stopping one by one would elect anew and
    # wait for the nodes already gone at each step.
    for _, pid in nodes:
        _terminate(pid)
    for name, pid in nodes:
        _stop(settings, comp, pid)
        _pid_file(settings, name).unlink(missing_ok=True)
    return bool(nodes)


def _cluster_status(settings: Settings, comp: Component) -> list[ComponentStatus]:
    healthy = (_kafka_cluster_healthy if comp == "kafka" else _redis_cluster_healthy)(settings)
    out: list[ComponentStatus] = []
    if comp == "kafka":
        for kn in kafka_nodes(settings):
            pid = _owned_node_pid(settings, kn.name, partial(_kafka_node_owns, kn))
            out.append(ComponentStatus(kn.name, pid is not None, pid, kn.port, healthy, kn.log))
    else:
        for rn in redis_nodes(settings):
            pid = _owned_node_pid(settings, rn.name, partial(_redis_node_owns, rn))
            out.append(ComponentStatus(rn.name, pid is not None, pid, rn.port, healthy, rn.log))
    return out


def _clustered(settings: Settings, comp: Component) -> bool:
    return (comp == "kafka" and kafka_clustered(settings)) or (
        comp == "redis" and redis_clustered(settings)
    )


def _healthy(settings: Settings, comp: Component) -> bool:
    if comp == "kafka" and kafka_clustered(settings):
        return _kafka_cluster_healthy(settings)
    if comp == "redis" and redis_clustered(settings):
        return _redis_cluster_healthy(settings)
    return _HEALTH[comp](settings)


# --------------------------------------------------------------------------- public API


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
    comps = _validate(components)
    todo = [c for c in comps if not _healthy(settings, c)]
    if not todo:
        return []
    preflight(todo, settings)
    started: list[Component] = []
    waiting: list[tuple[Component, int | None]] = []
    try:
        for comp in todo:
            if _clustered(settings, comp):
                if _up_cluster(settings, comp):
                    started.append(comp)
                continue
            pid = _owned_pid(settings, comp)
            if pid is not None:
                # Ours and alive but not healthy yet: another `up` is starting it.
                waiting.append((comp, pid))
                continue
            ports = [_port(settings, comp)]
            if comp == "kafka":
                ports.append(settings.stack.kafka_controller_port)
            for port in ports:
                if _port_open(port):
                    raise StackError(
                        f"port {port} is in use by something that is not a healthy {comp}: "
                        f"stop it or choose another port (RTPIPE_STACK__...)"
                    )
            pid = _start(settings, comp)
            started.append(comp)
            waiting.append((comp, pid))
        for comp, pid in waiting:
            _wait_healthy(settings, comp, pid)
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
    comps = list(COMPONENTS) if only is None else _validate(only)
    stopped: list[str] = []
    # Reverse dependency order: Prometheus first, Kafka last.
    for comp in reversed(comps):
        # Cluster nodes too, found by their PID files whatever mode ``settings`` are in.
        node_stopped = comp != "prometheus" and _down_cluster(settings, comp)
        pid = _owned_pid(settings, comp)
        if pid is not None:
            _stop(settings, comp, pid)
            _pid_file(settings, comp).unlink(missing_ok=True)
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
        if _clustered(settings, comp):
            out.update((node.name, node) for node in _cluster_status(settings, comp))
            continue
        pid = _owned_pid(settings, comp)
        log = _log_file(settings, comp)
        out[comp] = ComponentStatus(
            name=comp,
            running=pid is not None,
            pid=pid,
            port=_port(settings, comp),
            healthy=_HEALTH[comp](settings),
            log=log,
        )
    return out

"""The files a start writes (Kafka's server.properties and log4j2 file, Prometheus' scrape
config), the broker's java command line and the formatting of Kafka's storage."""

from __future__ import annotations

import base64
import logging
import shutil
import subprocess
import uuid
from pathlib import Path

from infra.stack.errors import StackError
from infra.stack.nodes import KafkaNode, kafka_nodes
from infra.stack.paths import (
    kafka_properties_file,
    log_file,
    prometheus_config_file,
    run_dir,
    write_private,
)
from infra.stack.secure import kafka_server_properties, scram_format_args
from stages.shared.settings import Settings
from stages.shared.topology import STAGES

logger = logging.getLogger(__name__)

# Rule files Prometheus loads; shipped in the infra package (infra/prometheus/).
# Every redis-server the stack starts: append-only, in the foreground, logging to stdout
# (the spawned process's log file).
REDIS_SERVER_FLAGS = ("--appendonly", "yes", "--daemonize", "no", "--logfile", "")
ALERTS_FILE = Path(__file__).resolve().parents[1] / "prometheus" / "alerts.yml"


def write_kafka_config(settings: Settings, node: KafkaNode | None = None) -> Path:
    """The broker's server.properties (and log4j2 file): the single node, or ``node`` of the
    cluster stack."""
    run = run_dir(settings)
    st = settings.stack
    if node is None:
        conf_dir, data = run / "kafka", run / "kafka-data"
        node_id, port, controller_port = 1, st.kafka_port, st.kafka_controller_port
        voters = f"1@127.0.0.1:{st.kafka_controller_port}"
        log = log_file(settings, "kafka")
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
    if st.secure:
        listeners = kafka_server_properties(settings, port, controller_port)
    else:
        listeners = [
            f"listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
            f"advertised.listeners=PLAINTEXT://127.0.0.1:{port}",
            "controller.listener.names=CONTROLLER",
            "inter.broker.listener.name=PLAINTEXT",
            "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        ]
    props = conf_dir / "server.properties"
    # Private: in secure mode it holds the broker user's password.
    write_private(
        props,
        "\n".join(
            [
                "# Written by infra/stack/config.py on every start; edit the code, not this file.",
                "process.roles=broker,controller",
                f"node.id={node_id}",
                f"controller.quorum.voters={voters}",
                *listeners,
                f"log.dirs={data}",
                f"num.partitions={settings.topics.partitions}",
                *replication,
                # Consumers of a fresh group start at once instead of waiting 3 s.
                "group.initial.rebalance.delay.ms=0",
                "",
            ]
        ),
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


def kafka_java(
    settings: Settings, libs: Path, main: str, *args: str, conf_dir: Path | None = None
) -> list[str]:
    """The java command line that runs ``main`` of Kafka's jars in ``libs`` with our heap and
    log4j2 file (the single node's, or ``conf_dir``'s)."""
    java = shutil.which("java") or "java"
    log4j = (conf_dir or kafka_properties_file(settings).parent) / "log4j2.properties"
    return [
        java,
        f"-Xmx{settings.stack.kafka_heap}",
        "-XX:+UseG1GC",
        *settings.stack.kafka_jvm_opts.split(),
        "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={log4j}",
        "-cp",
        f"{libs}/*",
        main,
        *args,
    ]


def random_cluster_id() -> str:
    """What ``StorageTool random-uuid`` prints, without a second JVM start (~2 s)."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        # Kafka's own generator rejects ids starting with "-": they read as CLI flags.
        if not cid.startswith("-"):
            return cid


# In a node's data dir: its storage was formatted with the secure stack's SCRAM users.
_SECURE_MARKER = "rtpipe-secure"


def format_storage(
    settings: Settings, libs: Path, props: Path, data: Path, cluster_id: str, name: str
) -> None:
    """Format a node's storage (``data``) unless it is formatted already; in secure mode with
    the SCRAM users, whose passwords go through a private argument file, not the command line.

    Raises:
        StackError: the format fails, or the storage was formatted for the other mode.
    """
    secure = settings.stack.secure
    if (data / "meta.properties").is_file():
        if secure != (data / _SECURE_MARKER).is_file():
            mode = "without" if secure else "with"
            raise StackError(
                f"{name}'s storage {data} was formatted {mode} --secure: stop the stack and "
                "remove it, or use another RTPIPE_HOME"
            )
        return
    args = ["format", "-t", cluster_id, "-c", str(props)]
    cmd = kafka_java(settings, libs, "kafka.tools.StorageTool", *args, conf_dir=props.parent)
    argfile = props.parent / "format.args"
    if secure:
        # java reads the main class and its arguments from @file itself: the passwords never
        # reach /proc/*/cmdline.
        main_at = cmd.index("kafka.tools.StorageTool")
        rest = [*cmd[main_at:], *scram_format_args(settings)]
        write_private(argfile, "".join(f'"{a}"\n' for a in rest))
        cmd = [*cmd[:main_at], f"@{argfile}"]
    try:
        fmt = subprocess.run(cmd, capture_output=True, text=True, check=False)
    finally:
        argfile.unlink(missing_ok=True)
    if fmt.returncode != 0:
        detail = (fmt.stdout + fmt.stderr).strip()[-300:]
        raise StackError(f"kafka storage format of {name} failed: {detail}")
    if secure:
        (data / _SECURE_MARKER).write_text("formatted with the secure stack's SCRAM users\n")
    logger.info("formatted Kafka storage %s (cluster %s)", data, cluster_id)


def format_kafka_storage(settings: Settings, libs: Path, props: Path) -> None:
    """Format the single node's storage with a new cluster id, unless it is formatted already."""
    data = run_dir(settings) / "kafka-data"
    format_storage(settings, libs, props, data, random_cluster_id(), "kafka")


def write_prometheus_config(settings: Settings) -> Path:
    """Prometheus' config: the alert rules and every stage's metrics ports as scrape targets."""
    conf = prometheus_config_file(settings)
    conf.parent.mkdir(parents=True, exist_ok=True)
    (conf.parent / "data").mkdir(exist_ok=True)
    host = settings.metrics.host
    # A stage bound to every interface is still scraped over loopback.
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    lines = [
        "# Written by infra/stack/config.py on every start; edit the code, not this file.",
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

"""The nodes of the cluster stack (``infra/stack/cluster.py``): whether ``settings`` ask for
it, and each node's ports, directories and logs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from infra.stack.components import Component
from infra.stack.paths import run_dir
from stages.shared.settings import Settings


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


def clustered(settings: Settings, comp: Component) -> bool:
    """Whether ``comp`` runs as a cluster of nodes under ``settings`` (Prometheus never does)."""
    return (comp == "kafka" and kafka_clustered(settings)) or (
        comp == "redis" and redis_clustered(settings)
    )


def kafka_nodes(settings: Settings) -> list[KafkaNode]:
    """The Kafka nodes of the cluster stack, node ids 1..N."""
    st = settings.stack
    run = run_dir(settings)
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
    run = run_dir(settings)
    return [
        RedisNode(port=st.redis_port + i, dir=run / f"redis-{st.redis_port + i}")
        for i in range(2 * st.redis_cluster_masters)
    ]

"""Health checks: whether a component, or the cluster of its nodes, answers on its port,
whoever started it."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import TYPE_CHECKING

from infra.stack.components import Component
from infra.stack.nodes import kafka_clustered, kafka_nodes, redis_clustered, redis_nodes
from infra.stack.secure import kafka_probe_config, redis_probe_options
from stages.shared.settings import Settings

if TYPE_CHECKING:
    import redis


def port_open(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    """Whether something accepts a TCP connection on ``port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _kafka_healthy(settings: Settings) -> bool:
    port = settings.stack.kafka_port
    # A TCP probe first: librdkafka would log connection errors for a closed port.
    if not port_open(port):
        return False
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    admin = AdminClient(
        {"bootstrap.servers": f"127.0.0.1:{port}", "log_level": 0, **kafka_probe_config(settings)}
    )
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

    return redis.Redis(
        host="127.0.0.1",
        port=port,
        **redis_probe_options(settings),  # type: ignore[arg-type]
        socket_timeout=2,
        socket_connect_timeout=2,
        # A probe answers once: redis-py's default retries turn one timeout into twelve seconds.
        retry=Retry(NoBackoff(), 0),
    )


def _redis_healthy(settings: Settings) -> bool:
    port = settings.stack.redis_port
    if not port_open(port):
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
    if not port_open(port):
        return False
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2) as resp:
            return int(resp.status) == 200
    except (urllib.error.URLError, OSError):
        return False


HEALTH: dict[Component, Callable[[Settings], bool]] = {
    "kafka": _kafka_healthy,
    "redis": _redis_healthy,
    "prometheus": _prometheus_healthy,
}


def kafka_cluster_healthy(settings: Settings) -> bool:
    """Every node of the Kafka cluster stack is a broker of one cluster that has a controller."""
    nodes = kafka_nodes(settings)
    open_ports = [n.port for n in nodes if port_open(n.port)]
    if len(open_ports) < len(nodes):
        return False
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    admin = AdminClient(
        {
            "bootstrap.servers": ",".join(f"127.0.0.1:{p}" for p in open_ports),
            "log_level": 0,
            **kafka_probe_config(settings),
        }
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


def cluster_info(settings: Settings, port: int) -> dict[str, str]:
    """``CLUSTER INFO`` of the node on ``port`` as a dict (empty if it does not answer)."""
    if not port_open(port):
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


def redis_cluster_healthy(settings: Settings) -> bool:
    """Every Redis Cluster node reports ``cluster_state:ok`` and knows all the nodes."""
    nodes = redis_nodes(settings)
    for node in nodes:
        info = cluster_info(settings, node.port)
        if info.get("cluster_state") != "ok" or info.get("cluster_known_nodes") != str(len(nodes)):
            return False
    return True


def healthy(settings: Settings, comp: Component) -> bool:
    """Whether ``comp`` is healthy: its cluster where ``settings`` ask for one, else its node."""
    if comp == "kafka" and kafka_clustered(settings):
        return kafka_cluster_healthy(settings)
    if comp == "redis" and redis_clustered(settings):
        return redis_cluster_healthy(settings)
    return HEALTH[comp](settings)

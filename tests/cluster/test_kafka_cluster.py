"""The cluster stack's Kafka: three KRaft nodes, topics and internal topics on three replicas
with min.insync.replicas 2, and exactly-once produce/consume across the quorum."""

from __future__ import annotations

import time
import uuid

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource

from infra import stack
from infra.stack.procs import stop_process
from stages.shared.kafka import ensure_topics
from stages.shared.settings import Settings, TopicSettings
from tests.support import CLUSTER_BASE
from tests.support import CLUSTER_FULL as FULL

pytestmark = pytest.mark.integration


def test_three_brokers_one_quorum(kafka_cluster: Settings) -> None:
    admin = AdminClient(kafka_cluster.kafka.client_config())
    meta = admin.list_topics(timeout=10)
    assert sorted(meta.brokers) == [1, 2, 3]
    assert meta.controller_id in (1, 2, 3)
    status = stack.status(kafka_cluster)
    nodes = {k: v for k, v in status.items() if k.startswith("kafka-")}
    assert sorted(nodes) == ["kafka-1", "kafka-2", "kafka-3"]
    assert all(st.healthy and st.running for st in nodes.values())
    assert [st.port for st in nodes.values()] == [CLUSTER_BASE + 92 + 100 * i for i in range(3)]


def test_topics_and_internal_topics_are_replicated(kafka_cluster: Settings) -> None:
    settings = kafka_cluster
    topics = TopicSettings(prefix=f"t{uuid.uuid4().hex[:10]}.", replication_factor=3)
    name = topics.name("transactions")
    assert ensure_topics(settings.kafka, topics, [name]) == [name]
    conf = settings.kafka.client_config()
    producer = Producer(
        {**conf, "transactional.id": f"tx-{uuid.uuid4().hex}", "enable.idempotence": True}
    )
    producer.init_transactions(30)
    producer.begin_transaction()
    for i in range(10):
        producer.produce(name, key=str(i).encode(), value=b"v%d" % i)
    producer.commit_transaction(30)

    group = f"g-{uuid.uuid4().hex[:8]}"
    consumer = Consumer(
        {
            **conf,
            "group.id": group,
            "isolation.level": "read_committed",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([name])
    got: list[bytes] = []
    deadline = time.monotonic() + 30
    while len(got) < 10 and time.monotonic() < deadline:
        msg = consumer.poll(0.5)
        if msg is not None and msg.error() is None:
            got.append(msg.value())
    consumer.commit(asynchronous=False)
    committed = consumer.committed(
        [TopicPartition(name, p) for p in range(topics.partitions)], timeout=10
    )
    consumer.close()
    assert sorted(got) == sorted(b"v%d" % i for i in range(10))
    assert sum(max(tp.offset, 0) for tp in committed) >= 10

    admin = AdminClient(conf)
    meta = admin.list_topics(timeout=10)
    for topic in (name, "__consumer_offsets", "__transaction_state"):
        partitions = meta.topics[topic].partitions.values()
        assert all(len(p.replicas) == 3 for p in partitions), topic
        assert all(len(p.isrs) >= 2 for p in partitions), topic
    resources = [ConfigResource("topic", t) for t in (name, "__transaction_state")]
    for res, fut in admin.describe_configs(resources).items():
        assert fut.result(timeout=10)["min.insync.replicas"].value == "2", res


@pytest.mark.skipif(not FULL, reason="long variant: RTPIPE_CLUSTER_FULL=1")
def test_a_stopped_broker_loses_no_committed_write(kafka_cluster: Settings) -> None:
    """acks=all producing goes on with one broker down (min.insync.replicas 2 of 3)."""
    settings = kafka_cluster
    topics = TopicSettings(prefix=f"t{uuid.uuid4().hex[:10]}.", replication_factor=3)
    name = topics.name("transactions")
    ensure_topics(settings.kafka, topics, [name])
    node = stack.kafka_nodes(settings)[2]
    pid = int((settings.run_dir / f"{node.name}.pid").read_text())
    stop_process(settings, "kafka", pid)
    try:
        producer = Producer({**settings.kafka.client_config(), "acks": "all"})
        for i in range(100):
            producer.produce(name, value=b"%d" % i)
        assert producer.flush(60) == 0
    finally:
        stack.up(settings, components=("kafka",))

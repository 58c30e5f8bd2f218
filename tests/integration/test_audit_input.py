"""What the pipeline was given: the audit's input count reads the ``transactions`` topic, so
a replayed record the broker does not hold (a restarted single broker dropped three that its
producer saw acknowledged, in a chaos run) is told apart from one the pipeline lost."""

from __future__ import annotations

import pytest
from confluent_kafka import Producer

from stages.ops.audit import input_transaction_ids
from stages.shared.kafka import ensure_topics, producer_config
from stages.shared.settings import Settings

pytestmark = pytest.mark.integration


def test_input_ids_are_the_expected_ones_the_input_topic_holds(unique_topics: Settings) -> None:
    settings = unique_topics
    topic = settings.topics.name("transactions")
    ensure_topics(settings.kafka, settings.topics, [topic])
    producer = Producer(producer_config(settings.kafka))
    for tid in (1, 2, 3, 5, 6, 99):  # 4 never arrives; 99 is not expected (a warm-up, say)
        value = b'{"transaction_id":%d,"customer_id":7,"terminal_id":8,"amount":1.5}' % tid
        producer.produce(topic, key=b"7", value=value)
    producer.produce(topic, key=b"7", value=b"not json")
    producer.produce(topic, key=b"7", value=None)
    assert producer.flush(30) == 0

    assert input_transaction_ids(settings, range(1, 7)) == {1, 2, 3, 5, 6}
    assert input_transaction_ids(settings, []) == set()

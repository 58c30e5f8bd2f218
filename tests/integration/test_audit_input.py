"""What the pipeline was given: the audit's input count reads the ``transactions`` topic, so
a replayed record the broker does not hold (a restarted single broker dropped three that its
producer saw acknowledged, in a chaos run) is told apart from one the pipeline lost."""

from __future__ import annotations

import orjson
import pandas as pd
import pytest
from confluent_kafka import Producer

from stages.ops import replay as replay_module
from stages.ops.audit import input_transaction_ids, read_topic
from stages.ops.replay import ReplayPlan, build_events
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


def test_a_replay_whose_producer_stops_delivering_sends_the_rest_from_a_new_one(
    unique_topics: Settings, small_tx: pd.DataFrame, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A producer that acknowledges nothing (here: one that cannot reach any broker; in a
    chaos run, one stuck without its producer id after a broker restart) is replaced after
    the flush wait, and every event of the plan reaches the topics once."""
    settings = unique_topics
    ensure_topics(settings.kafka, settings.topics)
    monkeypatch.setattr(replay_module, "FLUSH_TIMEOUT_S", 3.0)
    stuck = Producer(
        producer_config(settings.kafka, **{"bootstrap.servers": "127.0.0.1:9", "linger.ms": 5})
    )
    begin = small_tx["tx_datetime"].min().normalize() + pd.Timedelta(days=40)
    plan = ReplayPlan(begin, begin + pd.Timedelta(hours=6))
    result = replay_module.replay(settings, small_tx, plan, producer=stuck)

    assert result.transactions > 0
    assert result.resent == result.transactions + result.labels + result.history
    got = sorted(
        orjson.loads(v)["transaction_id"]
        for _, v, _ in read_topic(settings, settings.topics.name("transactions"))
        if v
    )
    expected = build_events(small_tx, plan)
    assert got == sorted(expected.loc[expected["kind"] != 0, "transaction_id"].tolist())

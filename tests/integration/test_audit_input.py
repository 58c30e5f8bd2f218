"""What the pipeline was given: the audit's input count reads the ``transactions`` topic, so
a replayed record the broker does not hold (a restarted single broker dropped three that its
producer saw acknowledged, in a chaos run) is told apart from one the pipeline lost."""

from __future__ import annotations

import orjson
import pandas as pd
import pytest
from confluent_kafka import Producer

from stages.ops import replay as replay_module
from stages.ops.audit import input_transaction_ids, read_topic, where_stopped
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


def test_where_stopped_counts_committed_and_uncommitted_ids_per_topic_and_partition(
    unique_topics: Settings,
) -> None:
    """A chaos run's undecided transactions are located: the first topic that holds fewer
    of them than the one before names the stage that did not pass them on."""
    settings = unique_topics
    t = settings.topics
    names = [t.name(k) for k in ("transactions", "enriched", "predictions")]
    ensure_topics(settings.kafka, t, names)

    def value(tid: int) -> bytes:
        return b'{"transaction_id":%d,"customer_id":7}' % tid

    plain = Producer(producer_config(settings.kafka))
    for tid in (1, 2, 3, 4):
        plain.produce(names[0], value=value(tid), partition=tid % 2)
    plain.produce(names[0], value=value(1), partition=1)  # a copy counts once
    plain.produce(names[0], value=value(50), partition=0)  # not asked about
    for tid in (1, 2, 3):
        plain.produce(names[1], value=value(tid), partition=0)
    assert plain.flush(30) == 0
    # 3 reached predictions only in a transaction that was aborted, 2 in one left open.
    aborted = Producer(producer_config(settings.kafka, **{"transactional.id": t.prefix + "ws-a"}))
    aborted.init_transactions(30)
    aborted.begin_transaction()
    aborted.produce(names[2], value=value(3), partition=1)
    aborted.flush(30)
    aborted.abort_transaction(30)
    committed = Producer(producer_config(settings.kafka, **{"transactional.id": t.prefix + "ws-c"}))
    committed.init_transactions(30)
    committed.begin_transaction()
    committed.produce(names[2], value=value(1), partition=0)
    committed.commit_transaction(30)
    pending = Producer(producer_config(settings.kafka, **{"transactional.id": t.prefix + "ws-o"}))
    pending.init_transactions(30)
    pending.begin_transaction()
    pending.produce(names[2], value=value(2), partition=1)
    pending.flush(30)

    lines = where_stopped(settings, [1, 2, 3, 4])
    pending.abort_transaction(30)
    assert lines == [
        f"{names[0]}: 4 of 4 committed (p0 2 p1 2), 0 more uncommitted",
        f"{names[1]}: 3 of 4 committed (p0 3), 0 more uncommitted",
        f"{names[2]}: 1 of 4 committed (p0 1), 2 more uncommitted",
    ]

"""The evaluation stage's join store (``stages/evaluation/app.py``) on the real Redis Cluster:
either order joins, a redelivered record is a duplicate, the window and the retraining
cooldown are shared, and a flushed script cache is reloaded without applying a record twice."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from stages.evaluation.app import RedisJoinStore
from stages.evaluation.join import JoinItem, decode_window
from stages.shared.settings import EvaluationSettings, Settings

pytestmark = pytest.mark.integration


@pytest.fixture
def store(redis_cluster: Settings) -> Iterator[RedisJoinStore]:
    namespace = f"t{uuid.uuid4().hex[:12]}.evaluation"
    client = redis_cluster.redis.client()
    yield RedisJoinStore(client, namespace, EvaluationSettings(window=50))
    for node in client.get_primaries():
        for key in list(node.redis_connection.scan_iter(match=f"rtpipe:eval:{{{namespace}}}:*")):
            node.redis_connection.delete(key)
    client.close()


def pred(tid: int) -> JoinItem:
    return JoinItem("prediction", tid, f"0.{tid}|v0001|{1_000 + tid}")


def label(tid: int) -> JoinItem:
    return JoinItem("label", tid, str(tid % 2))


def test_join_store_on_the_cluster(store: RedisJoinStore) -> None:
    # Predictions first for 0..29, labels first for 30..39.
    assert (
        store.offer([pred(t) for t in range(30)] + [label(t) for t in range(30, 40)])
        == ["pending"] * 40
    )
    assert (
        store.offer([label(t) for t in range(20)] + [pred(t) for t in range(30, 40)])
        == ["joined"] * 30
    )
    # Redelivered (a batch redone after an aborted transaction): counted once.
    assert store.offer([label(3), pred(31)]) == ["duplicate", "duplicate"]

    # The script cache emptied on every primary: the batch is redone after a reload.
    client = store._client
    for node in client.get_primaries():
        node.redis_connection.script_flush()
    assert store.offer([label(t) for t in range(20, 30)] + [pred(50)]) == ["joined"] * 10 + [
        "pending"
    ]
    for node in client.get_primaries():
        node.redis_connection.script_flush()
    assert store.offer([label(50), label(7)]) == ["joined", "duplicate"]

    window = decode_window(store.window())
    assert len(window) == 41
    assert sorted(int(v) for v in window.event_ms) == sorted(1_000 + t for t in [*range(40), 50])
    assert list(window.is_fraud[window.event_ms == 1_007]) == [1]

    assert store.claim_retrain(60, "first") is True
    assert store.claim_retrain(60, "second") is False

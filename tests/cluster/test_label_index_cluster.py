"""The label index (``stages/shared/labels.py``) on the real Redis Cluster: the cluster
client takes the index's pipelined path (one ``EVALSHA`` per terminal, routed by the
terminal's hash tag), its scripts are loaded on every primary, a flushed script cache is
reloaded, and the terminal windows equal the stream reference
(``tests.terminal_reference.terminal_features``) on random labels."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from stages.shared.labels import (
    _ADD_LABELS,
    _COUNT_WINDOWS,
    Label,
    LabelIndex,
    PartitionProgress,
)
from stages.shared.online.resp import RawRedis
from stages.shared.schemas import DAY_MS, LABEL_DELAY_DAYS, TERMINAL_FEATURES, WINDOWS_DAYS
from stages.shared.settings import Settings
from tests.terminal_reference import TerminalState, add_label, terminal_features

pytestmark = pytest.mark.integration

T0_MS = 1_525_132_800_000  # 2018-05-01
# The reference keeps every label: the index's retention (67 days) is longer than the span.
NO_PRUNING_MS = 10**13


@pytest.fixture
def cluster_client(redis_cluster: Settings) -> Iterator[tuple[Any, str]]:
    """The cluster client and a project of its own; the project's keys dropped after."""
    project = f"t{uuid.uuid4().hex[:12]}"
    client = redis_cluster.redis.client()
    yield client, project
    for node in client.get_primaries():
        conn = node.redis_connection
        for pattern in (f"{{{project}:lbl:*", f"{project}:lbl:*"):
            keys = list(conn.scan_iter(match=pattern, count=1000))
            for key in keys:
                conn.delete(key)
    client.close()


def random_labels(rng: np.random.Generator, n: int, terminals: int, days: int) -> list[Label]:
    """``n`` labels of distinct transactions on ``terminals`` terminals over ``days`` days,
    with many same-millisecond ties (times on a 10 s grid)."""
    tx_ms = T0_MS + rng.integers(0, days * 8640, n) * 10_000
    return [
        Label(int(i), int(t), int(ms), int(f))
        for i, t, ms, f in zip(
            rng.permutation(10 * n)[:n],
            rng.integers(0, terminals, n),
            tx_ms,
            rng.random(n) < 0.15,
            strict=True,
        )
    ]


def reference(labels: list[Label], terminal_id: np.ndarray, event_ms: np.ndarray) -> np.ndarray:
    """The stream processor's terminal features, one state per terminal."""
    states: dict[int, TerminalState] = {}
    for lab in labels:
        state = states.setdefault(lab.terminal_id, TerminalState([], [], [], 0))
        add_label(state, lab.tx_ms, lab.transaction_id, lab.is_fraud, NO_PRUNING_MS)
    out = np.empty((len(terminal_id), len(TERMINAL_FEATURES)))
    for row, (term, ms) in enumerate(zip(terminal_id.tolist(), event_ms.tolist(), strict=True)):
        state = states.get(term, TerminalState([], [], [], 0))
        feats = terminal_features(state, ms, NO_PRUNING_MS)
        out[row] = [feats[name] for name in TERMINAL_FEATURES]
    return out


def events(
    rng: np.random.Generator, labels: list[Label], n: int, terminals: int
) -> tuple[np.ndarray, np.ndarray]:
    """Random events, plus events on every window boundary of some labels (a label exactly
    ``7 + w`` days before is outside its window, one exactly 7 days before inside)."""
    term = rng.integers(0, terminals + 20, n)  # 20 terminals without any label
    ms = T0_MS + rng.integers(0, 60 * DAY_MS, n)
    picks = [labels[i] for i in rng.choice(len(labels), 100, replace=False)]
    b_term, b_ms = [], []
    for lab in picks:
        for d in (LABEL_DELAY_DAYS, *(LABEL_DELAY_DAYS + w for w in WINDOWS_DAYS)):
            for delta in (-1, 0, 1):
                b_term.append(lab.terminal_id)
                b_ms.append(lab.tx_ms + d * DAY_MS + delta)
    return (
        np.concatenate([term, np.asarray(b_term)]).astype(np.int64),
        np.concatenate([ms, np.asarray(b_ms)]).astype(np.int64),
    )


def test_label_index_on_the_cluster_equals_the_stream_reference(
    cluster_client: tuple[Any, str],
) -> None:
    client, project = cluster_client
    rng = np.random.default_rng(12)
    index = LabelIndex(client, project, "labels")
    assert not RawRedis.supports(client)  # the pipelined path, one script call per terminal

    labels = random_labels(rng, 6_000, terminals=400, days=50)
    # In random batches and order, each batch with its progress; then every label again.
    order = rng.permutation(len(labels))
    for b, chunk in enumerate(np.array_split(order, 7)):
        batch = [labels[i] for i in chunk]
        assert index.add(batch, {b % 4: PartitionProgress(b + 1, batch[-1].tx_ms)}) == []
    assert index.add(labels, {}) == []  # idempotent: nothing changes, nothing conflicts
    # A contradicting label (same transaction, other fraud flag) is reported, not stored.
    first = labels[0]
    liar = Label(first.transaction_id, first.terminal_id, first.tx_ms, 1 - first.is_fraud)
    assert index.add([liar], {}) == [0]

    # The terminals' keys are spread over every primary; each terminal's pair on one slot.
    primaries = client.get_primaries()
    assert len(primaries) == 3
    per_node = [
        sum(1 for _ in node.redis_connection.scan_iter(match=f"{{{project}:lbl:*", count=1000))
        for node in primaries
    ]
    assert all(n > 0 for n in per_node), per_node
    assert sum(per_node) == len({lab.terminal_id for lab in labels}) + len(
        {lab.terminal_id for lab in labels if lab.is_fraud}
    )

    terms, ms = events(rng, labels, 3_000, terminals=400)
    want = reference(labels, terms, ms)
    got, progress = index.terminal_features(terms, ms, with_progress=True)
    np.testing.assert_array_equal(got, want)
    # Both scripts, once used, are loaded on every primary.
    for source in (_ADD_LABELS, _COUNT_WINDOWS):
        sha = hashlib.sha1(source.encode()).hexdigest()
        assert all(n.redis_connection.script_exists(sha) == [True] for n in primaries)
    assert progress == index.progress()
    assert sorted(progress) == [0, 1, 2, 3]
    assert progress[2].next_offset == 7  # batches 2 and 6 on partition 2: the last one wins

    # The script caches emptied on every primary (a restart, a failover to a replica that
    # never saw SCRIPT LOAD): the index reloads its scripts and answers the same.
    for node in primaries:
        node.redis_connection.script_flush()
    got_again, _ = index.terminal_features(terms, ms)
    np.testing.assert_array_equal(got_again, want)
    more = [Label(10**9 + i, i % 400, T0_MS + 51 * DAY_MS + i, i % 2) for i in range(50)]
    for node in primaries:
        node.redis_connection.script_flush()
    assert index.add(more, {}) == []
    late = np.full(400, T0_MS + 59 * DAY_MS, dtype=np.int64)
    np.testing.assert_array_equal(
        index.terminal_features(np.arange(400), late)[0],
        reference(labels + more, np.arange(400), late),
    )


def test_transaction_claims_made_again_are_not_conflicts_on_the_cluster(
    cluster_client: tuple[Any, str],
) -> None:
    """A batch redone after a crash claims its ids again with the same fingerprints: not a
    conflict, whether the claims go alone or in the label index's round trip (redis-py's
    SET callback used to turn the old value of SET ... GET into False: every re-claim a
    conflict, dead-lettered after a killed prediction replica)."""
    from stages.shared.claims import TransactionClaims

    client, project = cluster_client
    claims = TransactionClaims(client, project, 60)
    index = LabelIndex(client, project, "labels")
    ids = np.arange(1_000, 1_050, dtype=np.int64)
    fps = [10**18 + i for i in range(len(ids))]
    assert not claims.claim(ids[:25], fps[:25]).any()
    assert not claims.claim(ids[:25], fps[:25]).any()
    for _ in range(2):
        index.terminal_features(np.arange(50), np.full(50, T0_MS), tail=claims.commands(ids, fps))
        assert not claims.conflicts(index.last_tail_replies, fps).any()
    other = [f + 1 for f in fps]
    assert claims.claim(ids, other).all()
    for node in client.get_primaries():
        for key in list(node.redis_connection.scan_iter(match=f"{{{project}:tx}}:*")):
            node.redis_connection.delete(key)

"""The label index against real Redis: terminal windows counted over it equal the batch
definitions (training.features), writes are idempotent, contradicting labels are reported,
and the progress hash says how far each labels partition has been indexed."""

from __future__ import annotations

import uuid

import numpy as np
import pandas as pd
import pytest

from stages.shared.labels import (
    DEFAULT_RETENTION_MS,
    Label,
    LabelIndex,
    PartitionProgress,
    exact_mask,
)
from stages.shared.schemas import DAY_MS, LABEL_DELAY_DAYS, TERMINAL_FEATURES
from stages.shared.settings import Settings
from training.features import compute_features, event_ms
from training.simulate import SimulatorConfig, simulate

pytestmark = pytest.mark.integration


@pytest.fixture
def index(stack_settings: Settings) -> LabelIndex:
    client = stack_settings.redis.client()
    return LabelIndex(client, f"lbl{uuid.uuid4().hex[:8]}", "labels", DEFAULT_RETENTION_MS)


def labels_of(tx: pd.DataFrame) -> list[Label]:
    ms = event_ms(tx["tx_datetime"])
    return [
        Label(int(t), int(k), int(m), int(f))
        for t, k, m, f in zip(
            tx["transaction_id"], tx["terminal_id"], ms, tx["is_fraud"], strict=True
        )
    ]


def test_terminal_windows_equal_the_batch_definitions(index: LabelIndex) -> None:
    tx = simulate(
        SimulatorConfig(n_customers=120, n_terminals=40, nb_days=60, seed=3), progress=False
    )
    # Every label, in random order and in several writes (as partitions and batches mix them).
    labels = labels_of(tx)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(labels))
    for chunk in np.array_split(order, 7):
        assert index.add([labels[i] for i in chunk], {}) == []
    want = compute_features(tx).set_index("transaction_id")
    # Events from day 40 on: their 37-day windows lie inside the data.
    late = tx[tx["tx_datetime"] >= tx["tx_datetime"].min() + pd.Timedelta(days=40)]
    got, _ = index.terminal_features(
        late["terminal_id"].to_numpy(np.int64), event_ms(late["tx_datetime"])
    )
    expected = want.loc[late["transaction_id"], list(TERMINAL_FEATURES)].to_numpy(np.float64)
    assert len(late) > 1000 and (expected[:, 0] > 0).any() and (expected[:, 1] > 0).any()
    np.testing.assert_array_equal(got, expected)


def test_window_edges_and_an_unknown_terminal(index: LabelIndex) -> None:
    t = 1_530_000_000_000
    upper = t - LABEL_DELAY_DAYS * DAY_MS
    index.add(
        [
            Label(1, 7, upper, 1),  # exactly 7 days before: in every window
            Label(2, 7, upper + 1, 1),  # 1 ms too recent: in none
            Label(3, 7, upper - DAY_MS, 0),  # exactly 8 days: out of the 1-day window
            Label(4, 7, upper - DAY_MS + 1, 0),  # just inside it
            Label(5, 7, upper - 30 * DAY_MS + 1, 1),  # just inside the 30-day window
        ],
        {},
    )
    got, _ = index.terminal_features(np.array([7, 8]), np.array([t, t]))
    np.testing.assert_array_equal(got[0], [2.0, 0.5, 3.0, 1 / 3, 4.0, 0.5])
    np.testing.assert_array_equal(got[1], np.zeros(len(TERMINAL_FEATURES)))


def test_idempotent_and_contradictions_reported(index: LabelIndex) -> None:
    labels = [Label(i, i % 3, 1_530_000_000_000 + i, i % 2) for i in range(30)]
    assert index.add(labels, {0: PartitionProgress(30, 99)}) == []
    assert index.add(labels, {}) == []  # a replay of the same labels: nothing changes
    changed = [
        Label(4, 1, labels[4].tx_ms, 1 - labels[4].is_fraud),  # other fraud flag
        Label(5, 2, labels[5].tx_ms + 1, labels[5].is_fraud),  # other time
        Label(100, 1, 1_530_000_000_000, 1),  # new
    ]
    assert index.add(changed, {1: PartitionProgress(5, 7)}) == [0, 1]
    _, progress = index.terminal_features(np.array([1]), np.array([2_000_000_000_000]))
    assert progress is None
    assert index.progress() == {0: PartitionProgress(30, 99), 1: PartitionProgress(5, 7)}


def test_exact_mask() -> None:
    ev = np.array([100, 200, 300])
    done = {0: PartitionProgress(10, 50), 1: PartitionProgress(4, 250)}
    # Partition 0 is indexed up to its stable offset; partition 1 is behind, but holds a
    # label stamped 250: events up to 251 need nothing more from it.
    assert exact_mask(ev, done, {0: 10, 1: 9}).tolist() == [True, True, False]
    assert exact_mask(ev, done, {0: 10, 1: 4}).tolist() == [True, True, True]
    # A partition never indexed but with data: nothing is exact; without data: all is.
    assert exact_mask(ev, done, {2: 1}).tolist() == [False, False, False]
    assert exact_mask(ev, done, {2: 0}).tolist() == [True, True, True]

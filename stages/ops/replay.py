"""``rtpipe replay``: produce simulated transactions, and their labels when they become
known, to Kafka in event-time order, as fast as possible or at a fixed rate.

Transactions are keyed by customer id and timestamped with their event time; each carries
a header with the wall-clock time it was produced, the origin of end-to-end latency. Labels
are keyed by terminal id and timestamped when they become known (7 days after the
transaction). Labels of transactions from ``label_lookback_days`` before the window are
replayed too, so the terminal windows are complete from the first scored transaction.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
from confluent_kafka import KafkaException, Producer

from stages.shared.kafka import producer_config
from stages.shared.schemas import DAY_MS, LABEL_DELAY_DAYS, WINDOWS_DAYS
from stages.shared.settings import Settings

logger = logging.getLogger(__name__)

# How long a replay waits for its last events to be acknowledged (twice at most: once more
# after its producer is replaced).
FLUSH_TIMEOUT_S = 60.0

INGEST_HEADER = "rtpipe.ingest_ms"
# Marks a transaction that only warms the customer windows up (stages/enrichment/app.py).
WARMUP_HEADER = "rtpipe.warmup"


@dataclass(frozen=True)
class ReplayPlan:
    """What to replay: transactions with event time in [start, end)."""

    start: pd.Timestamp
    end: pd.Timestamp
    label_lookback_days: int = LABEL_DELAY_DAYS + max(WINDOWS_DAYS)
    # Transactions of this many days before ``start`` are sent first, marked warm-up
    # (header ``rtpipe.warmup``), so the customer windows are complete from the first scored
    # transaction; they are never scored.
    history_days: int = 0

    def transaction_ids(self, tx: pd.DataFrame) -> list[int]:
        """The ids of the transactions a replay of ``tx`` scores: those with event time in
        [start, end) (warm-up history and labels excluded), each of which must end in
        exactly one outcome."""
        sel = (tx["tx_datetime"] >= self.start) & (tx["tx_datetime"] < self.end)
        return tx.loc[sel, "transaction_id"].tolist()


@dataclass
class ReplayResult:
    transactions: int
    labels: int
    seconds: float
    first_tx_id: int | None
    last_tx_id: int | None
    history: int = 0
    # Events sent again from a new producer after the first one stopped delivering.
    resent: int = 0

    @property
    def rate(self) -> float:
        return (self.transactions + self.labels) / self.seconds if self.seconds else 0.0


def _ms(ts: pd.Series) -> np.ndarray:
    return (ts.astype("datetime64[ms, UTC]").astype("int64")).to_numpy()


def build_events(tx: pd.DataFrame, plan: ReplayPlan) -> pd.DataFrame:
    """Transactions in the window and labels known before its end, merged in time order.

    Returns:
        Columns kind (0 = label, 1 = transaction, so a label known at ``t`` goes before a
        transaction at ``t``; 2 = history transaction, all before ``start``), ts_ms, key, and
        the payload fields.
    """
    start_ms = int(plan.start.value // 1_000_000)
    end_ms = int(plan.end.value // 1_000_000)
    tx_ms = _ms(tx["tx_datetime"])
    in_window = (tx_ms >= start_ms) & (tx_ms < end_ms)
    known_ms = tx_ms + LABEL_DELAY_DAYS * DAY_MS
    lab = (tx_ms >= start_ms - plan.label_lookback_days * DAY_MS) & (known_ms < end_ms)
    hist = (tx_ms >= start_ms - plan.history_days * DAY_MS) & (tx_ms < start_ms)

    def frame(kind: int, sel: np.ndarray, ts_ms: np.ndarray, key: str, real: bool) -> pd.DataFrame:
        """Events of the rows ``sel``; ``real``: a transaction (its amount), else a label
        (its fraud flag)."""
        rows = tx[sel]
        return pd.DataFrame(
            {
                "kind": kind,
                "ts_ms": ts_ms,
                "key": rows[key].to_numpy(),
                "transaction_id": rows["transaction_id"].to_numpy(),
                "customer_id": rows["customer_id"].to_numpy(),
                "terminal_id": rows["terminal_id"].to_numpy(),
                "amount": rows["amount"].to_numpy() if real else 0.0,
                "tx_ms": tx_ms[sel],
                "is_fraud": 0 if real else rows["is_fraud"].to_numpy(),
            }
        )

    events = pd.concat(
        [
            frame(2, hist, tx_ms[hist], "customer_id", real=True),
            # Stamped 1 ms before it becomes known: quixstreams orders equal timestamps of
            # different topics arbitrarily, and a transaction at the very instant a label
            # becomes known must see it (the window includes t - 7 days). The label's own
            # transaction time is in its value.
            frame(0, lab, known_ms[lab] - 1, "terminal_id", real=False),
            frame(1, in_window, tx_ms[in_window], "customer_id", real=True),
        ],
        ignore_index=True,
    )
    return events.sort_values(["ts_ms", "kind", "transaction_id"], kind="stable").reset_index(
        drop=True
    )


def replay_producer(settings: Settings) -> Producer:
    """The producer a replay uses (idempotent, 5 ms linger)."""
    return Producer(producer_config(settings.kafka, **{"linger.ms": 5}))


def replay(
    settings: Settings,
    tx: pd.DataFrame,
    plan: ReplayPlan,
    rate: float | None = None,
    progress: Callable[[int], None] | None = None,
    producer: Producer | None = None,
) -> ReplayResult:
    """Produce the plan's events; ``rate`` in transactions per second (None = max speed).

    Args:
        producer: a producer from :func:`replay_producer` to reuse. A new idempotent
            producer holds its first messages until it has fetched metadata and its
            producer id (hundreds of ms), which a latency measurement would count.

    Raises:
        KafkaException: if any message could not be delivered (after the producer's retries).
    """
    events = build_events(tx, plan)
    producer = producer or replay_producer(settings)
    tx_topic = settings.topics.name("transactions")
    labels_topic = settings.topics.name("labels")
    failures: list[str] = []
    acked = np.zeros(len(events), dtype=bool)

    def on_delivery(i: int, err: object, msg: object) -> None:
        if err is None:
            acked[i] = True
        else:
            failures.append(str(err))

    kinds = events["kind"].to_numpy()
    ts = events["ts_ms"].to_numpy()
    keys = events["key"].to_numpy()
    tids = events["transaction_id"].to_numpy()
    cids = events["customer_id"].to_numpy()
    terms = events["terminal_id"].to_numpy()
    amounts = events["amount"].to_numpy()
    tx_ms = events["tx_ms"].to_numpy()
    fraud = events["is_fraud"].to_numpy()
    n_tx = int((kinds == 1).sum())

    def send(producer: Producer, i: int) -> None:
        if kinds[i] != 0:
            value = b'{"transaction_id":%d,"customer_id":%d,"terminal_id":%d,"amount":%s}' % (
                tids[i],
                cids[i],
                terms[i],
                repr(float(amounts[i])).encode(),
            )
            topic = tx_topic
            headers = [(INGEST_HEADER, str(int(time.time() * 1000)).encode())]
            if kinds[i] == 2:
                headers.append((WARMUP_HEADER, b"1"))
        else:
            value = (
                b'{"transaction_id":%d,"customer_id":%d,"terminal_id":%d,"tx_ms":%d,'
                b'"is_fraud":%d}' % (tids[i], cids[i], terms[i], tx_ms[i], fraud[i])
            )
            topic = labels_topic
            headers = None
        while True:
            try:
                producer.produce(
                    topic,
                    value=value,
                    key=b"%d" % keys[i],
                    timestamp=int(ts[i]),
                    headers=headers,
                    on_delivery=lambda err, msg, i=i: on_delivery(i, err, msg),
                )
                return
            except BufferError:
                producer.poll(0.05)

    started = time.perf_counter()
    sent_tx = 0
    for i in range(len(events)):
        send(producer, i)
        if kinds[i] == 1:
            sent_tx += 1
            if rate:
                due = started + sent_tx / rate
                delay = due - time.perf_counter()
                if delay > 0:
                    producer.poll(0)
                    time.sleep(delay)
            if progress and sent_tx % 1000 == 0:
                progress(1000)
        if i % 10_000 == 0:
            producer.poll(0)
    remaining = producer.flush(FLUSH_TIMEOUT_S)
    resent = 0
    if remaining and not failures:
        # Still unacknowledged, none failed: an idempotent producer that never got its
        # producer id back delivers nothing more (seen once in a chaos run: every one of
        # 3,188 events stuck 45 s after a broker restart beside a CPU-bound process). A new
        # producer sends what was not acknowledged again: the pipeline drops a transaction
        # id it has seen as a duplicate and a label it holds is a no-op, so a copy of one
        # that did arrive is harmless.
        producer.purge()
        producer.flush(5)
        failures.clear()  # the purge's own reports
        pending = np.flatnonzero(~acked)
        logger.warning(
            "replay: %d of %d events unacknowledged after %.0f s; sending them again from a "
            "new producer",
            len(pending),
            len(events),
            FLUSH_TIMEOUT_S,
        )
        producer = replay_producer(settings)
        for i in pending.tolist():
            send(producer, i)
        resent = len(pending)
        remaining = producer.flush(FLUSH_TIMEOUT_S)
    if progress:
        progress(sent_tx % 1000)
    elapsed = time.perf_counter() - started
    if remaining or failures:
        raise KafkaException(
            f"replay: {remaining} messages undelivered, {len(failures)} failed "
            f"(first: {failures[:1]})"
        )
    tx_ids = tids[kinds == 1]
    return ReplayResult(
        transactions=n_tx,
        labels=int((kinds == 0).sum()),
        seconds=elapsed,
        first_tx_id=int(tx_ids.min()) if len(tx_ids) else None,
        last_tx_id=int(tx_ids.max()) if len(tx_ids) else None,
        history=int((kinds == 2).sum()),
        resent=resent,
    )

"""The baseline of goal 3: the per-event consumer of the classic Kafka + Feast tutorial.

Per message: JSON decode, one ``FeatureStore.get_online_features`` call for that event's
entities, a single-row LightGBM predict, one produce. Auto-committed offsets, no batching:
what the prediction stage's micro-batches, batched online read and batch predict replace.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from confluent_kafka import Consumer, KafkaError, Message, Producer

from stages.shared.kafka import producer_config
from stages.shared.schemas import REQUEST_FEATURES, is_night, is_weekend
from stages.shared.settings import Settings

logger = logging.getLogger(__name__)


class OnlineLookup(Protocol):
    """What the naive scorer needs of Feast's ``FeatureStore``."""

    def get_online_features(self, features: Any, entity_rows: list[dict[str, Any]]) -> Any: ...


class Predictor(Protocol):
    """What it needs of a LightGBM ``Booster``."""

    def predict(self, data: Any, **kwargs: Any) -> Any: ...


@dataclass
class NaiveScorer:
    """Scores one enriched event the tutorial way.

    Attributes:
        store: a Feast store (or anything with ``get_online_features``).
        service: the feature service (or feature references) to look up.
        model: a LightGBM booster.
        features: the model's input order (request features and online features).
    """

    store: OnlineLookup
    service: Any
    model: Predictor
    features: Sequence[str]

    def score(self, value: bytes) -> tuple[bytes, bytes]:
        """One message value in, (key, prediction JSON) out."""
        event = json.loads(value)
        online = self.store.get_online_features(
            features=self.service,
            entity_rows=[
                {"customer_id": event["customer_id"], "terminal_id": event["terminal_id"]}
            ],
        ).to_dict()
        event_ms = int(event["event_ms"])
        request = {
            "amount": float(event["amount"]),
            "is_weekend": is_weekend(event_ms),
            "is_night": is_night(event_ms),
        }
        row = [
            request[name] if name in REQUEST_FEATURES else _number(online[name][0])
            for name in self.features
        ]
        score = float(self.model.predict([row], num_threads=1)[0])
        out = {
            "transaction_id": event["transaction_id"],
            "score": score,
            "features": dict(zip(self.features, row, strict=True)),
            "ts": {**event.get("ts", {}), "predicted_ms": int(time.time() * 1000)},
        }
        return str(event["transaction_id"]).encode(), json.dumps(out).encode()


def _number(value: Any) -> float:
    return float("nan") if value is None else float(value)


def run_naive(
    settings: Settings, scorer: NaiveScorer, in_topic: str, out_topic: str, limit: int
) -> tuple[int, float]:
    """Consume ``limit`` messages one by one, score and produce each.

    Returns:
        (messages scored, seconds from the first message received to the last one
        delivered).
    """
    consumer = Consumer(
        {
            **settings.kafka.client_config(),
            "group.id": settings.topics.group("naive"),
            "auto.offset.reset": "earliest",
            "enable.auto.commit": True,
        }
    )
    producer = Producer(producer_config(settings.kafka))
    consumer.subscribe([in_topic])

    def fetch() -> list[Message]:
        msg = consumer.poll(1.0)
        return [] if msg is None else [msg]

    def forward(msg: Message) -> None:
        key, value = scorer.score(msg.value())
        producer.produce(out_topic, key=key, value=value)

    return pump(consumer, producer, limit, 30.0, fetch, forward, "naive consumer")


def pump(
    consumer: Consumer,
    producer: Producer,
    limit: int,
    idle_s: float,
    fetch: Callable[[], list[Message]],
    forward: Callable[[Message], None],
    name: str,
) -> tuple[int, float]:
    """A bare consume-produce loop: ``forward`` each message ``fetch`` returns until
    ``limit`` are done or none came for ``idle_s``; flush, close the consumer.

    Returns:
        (messages forwarded, seconds from the first message received to the flush).
    """
    done = 0
    started: float | None = None
    idle_since = time.monotonic()
    try:
        while done < limit and time.monotonic() - idle_since < idle_s:
            msgs = fetch()
            if not msgs:
                continue
            idle_since = time.monotonic()
            if started is None:
                started = time.perf_counter()
            for msg in msgs:
                err = msg.error()
                if err is not None:
                    if err.code() != KafkaError._PARTITION_EOF:
                        logger.warning("%s: %s", name, err)
                    continue
                forward(msg)
                done += 1
            producer.poll(0)
        producer.flush(60)
    finally:
        consumer.close()
    return done, (time.perf_counter() - started) if started is not None else 0.0

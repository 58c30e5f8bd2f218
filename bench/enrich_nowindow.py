"""The enrichment stage without its state (goal 6's baseline): the same quixstreams
application settings (consumer group, exactly-once, commit interval, client configs) and the
same parse, but no windows, no repartition and no online writes: parse -> forward.

Run as its own process: ``python -m bench.enrich_nowindow`` (settings from ``RTPIPE_*``).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from quixstreams import Application
from quixstreams.kafka.configuration import ConnectionConfig

from stages.enrichment.app import INGEST_HEADER
from stages.shared.schemas import InvalidMessage, parse_transaction
from stages.shared.settings import Settings


def build_app(settings: Settings) -> Application:
    cfg = settings.enrichment
    topics = settings.topics
    app = Application(
        broker_address=ConnectionConfig.from_librdkafka_dict(settings.kafka.client_config()),
        consumer_group=topics.group(cfg.consumer_group),
        auto_offset_reset="earliest",
        commit_interval=cfg.commit_interval_s,
        consumer_poll_timeout=cfg.poll_timeout_ms / 1000.0,
        processing_guarantee=cfg.processing_guarantee,
        state_dir=str(settings.home / "state" / topics.group(cfg.consumer_group)),
        producer_extra_config={"linger.ms": 2, "compression.type": "lz4"},
        consumer_extra_config={"fetch.wait.max.ms": settings.kafka.fetch_wait_max_ms},
        loglevel=None,
    )
    tx_topic = app.topic(
        topics.name("transactions"), value_deserializer="bytes", key_deserializer="bytes"
    )
    enriched = app.topic(topics.name("enriched"), value_serializer="json", key_serializer="string")
    max_bytes = settings.max_message_bytes

    def parse(value: bytes, key: Any, timestamp: int, headers: Any) -> dict[str, Any] | None:
        ingest_ms = timestamp
        for name, hv in headers or ():
            if name == INGEST_HEADER:
                ingest_ms = int(hv)
        try:
            tx = parse_transaction(value, timestamp, max_bytes)
        except InvalidMessage:
            return None
        return {
            "transaction_id": tx.transaction_id,
            "customer_id": tx.customer_id,
            "terminal_id": tx.terminal_id,
            "amount": tx.amount,
            "event_ms": tx.event_ms,
            "ts": {"ingest_ms": ingest_ms},
        }

    def finish(value: dict[str, Any]) -> dict[str, Any]:
        value["ts"]["enriched_ms"] = int(time.time() * 1000)
        return value

    sdf = app.dataframe(tx_topic).apply(parse, metadata=True)
    sdf = sdf[sdf.apply(lambda v: v is not None)]
    sdf.apply(finish).to_topic(enriched, key=lambda v: str(v["transaction_id"]))
    return app


def main() -> None:
    settings = Settings()
    logging.basicConfig(level=logging.WARNING)
    build_app(settings).run()


if __name__ == "__main__":
    main()

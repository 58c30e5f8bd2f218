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

from stages.enrichment.app import application, transaction_record
from stages.shared.settings import Settings


def build_app(settings: Settings) -> Application:
    topics = settings.topics
    app = application(settings, settings.enrichment.consumer_group)
    tx_topic = app.topic(
        topics.name("transactions"), value_deserializer="bytes", key_deserializer="bytes"
    )
    enriched = app.topic(topics.name("enriched"), value_serializer="json", key_serializer="string")

    def parse(value: bytes, key: Any, timestamp: int, headers: Any) -> dict[str, Any] | None:
        rec = transaction_record(settings, value, timestamp, headers)
        if "error" in rec:
            return None
        del rec["raw"]
        return rec

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

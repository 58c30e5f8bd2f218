"""Routing stage wiring: predictions -> decisions.action | decisions.review |
decisions.approved (or the DLQ), in one Kafka transaction with the input offsets.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import orjson
from confluent_kafka import Message

from stages.routing.logic import decide
from stages.shared.batch_loop import LoopStats
from stages.shared.kafka import Output, StopFlag, dead_letter, ensure_topics, where
from stages.shared.metrics import Metrics, build_metrics
from stages.shared.records import parse_prediction
from stages.shared.schemas import InvalidMessage
from stages.shared.settings import Settings, StageName
from stages.shared.stage_loop import stage_loop

logger = logging.getLogger(__name__)

STAGE: StageName = "routing"


@dataclass
class RoutingStage:
    settings: Settings
    metrics: Metrics

    def __post_init__(self) -> None:
        t = self.settings.topics
        self._topics = {
            "action": t.name("action"),
            "review": t.name("review"),
            "approved": t.name("approved"),
        }
        self._dlq = t.dlq(t.name("predictions"))

    def handle(self, msgs: list[Message]) -> list[Output]:
        """Route one micro-batch."""
        m = self.metrics
        m.messages_in.labels(STAGE).inc(len(msgs))
        m.batch_size.labels(STAGE).observe(len(msgs))
        cfg = self.settings.routing
        now_ms = int(time.time() * 1000)
        outputs: list[Output] = []
        for msg in msgs:
            try:
                rec = parse_prediction(msg.value()).fields
            except InvalidMessage as err:
                logger.warning("dead letter %s: %s", where(msg), err)
                m.dlq.labels(STAGE, err.reason).inc()
                outputs.append(dead_letter(self._dlq, msg, err.reason, err.detail))
                continue
            decision, reason = decide(rec, cfg)
            found_ts = rec.get("ts")
            ts: dict[str, Any] = found_ts if isinstance(found_ts, dict) else {}
            ts["routed_ms"] = now_ms
            rec["ts"] = ts
            rec["decision"] = decision
            rec["reason"] = reason
            start = ts.get("ingest_ms") or rec.get("event_ms")
            if isinstance(start, int) and start > 0:
                m.event_to_decision.observe(max(0.0, (now_ms - start) / 1000.0))
            m.decisions.labels(decision, reason).inc()
            topic = self._topics[decision]
            m.messages_out.labels(STAGE, topic).inc()
            event_ms = rec.get("event_ms")
            outputs.append(
                Output(
                    topic,
                    msg.key(),
                    orjson.dumps(rec),
                    timestamp_ms=event_ms if isinstance(event_ms, int) and event_ms > 0 else None,
                )
            )
        return outputs


def run(
    settings: Settings,
    stop: StopFlag,
    metrics: Metrics | None = None,
    *,
    max_idle_s: float | None = None,
) -> LoopStats:
    """Run the routing stage until ``stop`` is set."""
    stage = RoutingStage(settings, metrics or build_metrics())
    ensure_topics(settings.kafka, settings.topics)
    loop = stage_loop(settings, stage.metrics, STAGE, stage.handle, settings.routing)
    return loop.run(stop, max_idle_s=max_idle_s)

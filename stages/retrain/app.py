"""Retrain job wiring (``rtpipe retrain``): requests in on ``model.retrain_requests`` (consumer
group ``retrain``), a candidate trained on the latest window of the Feast offline store,
registered without promotion, served as shadow, promoted or withdrawn by the gate.

Every step is a line in the log and an event in the registry (``training.registry.events``,
shown by ``rtpipe model list``): ``requested``, ``candidate``, ``shadow``, ``gate``, then
``promoted``, ``rejected`` or ``withdrawn``; a request that arrives while a candidate is still
in shadow is recorded as ``skipped``.

State lives in the registry, not in the process: the shadow marker names the candidate whose
gate is open and its ``shadow`` event says since when. A request's offset is committed once its
candidate is registered and marked; a request redelivered after a crash before that commit is
recognised by its id (``topic[partition]@offset``) in the events and not trained twice. A
restarted job resumes the open gate.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pandas as pd
import redis
from confluent_kafka import Consumer, KafkaException, Message

from stages.evaluation.app import RedisJoinStore, redis_client
from stages.evaluation.join import JoinStore
from stages.evaluation.quality import ShadowComparison
from stages.retrain.logic import (
    GateDecision,
    RetrainRequest,
    WindowError,
    candidate_service,
    gate,
    latest_window,
    parse_request,
)
from stages.shared.kafka import StopFlag, consumer_config, ensure_topics, where
from stages.shared.schemas import InvalidMessage
from stages.shared.settings import Settings
from stages.shared.topology import retrain_requests_topic
from training import registry

logger = logging.getLogger(__name__)

STAGE = "retrain"


def comparison_store(settings: Settings) -> RedisJoinStore:
    """The evaluation stage's store, where it publishes champion-vs-shadow comparisons."""
    namespace = settings.topics.group(settings.evaluation.consumer_group)
    return RedisJoinStore(redis_client(settings), namespace, settings.evaluation)


@dataclass
class RetrainJob:
    """The request handler and the gate, over the registry and the comparison store."""

    settings: Settings
    store: JoinStore
    requests: int = field(init=False, default=0)
    promoted: list[str] = field(init=False, default_factory=list)

    @property
    def _name(self) -> str:
        return self.settings.prediction.model_name

    def _event(self, step: str, version: str | None = None, **details: Any) -> None:
        registry.record_event(self.settings.registry_dir, self._name, step, version, **details)

    # -- requests ----------------------------------------------------------------------------
    def open_gate(self) -> tuple[str, float] | None:
        """The candidate whose gate is open and when it became the shadow (epoch seconds)."""
        reg, name = self.settings.registry_dir, self._name
        shadow = registry.shadow_version(reg, name)
        if shadow is None:
            return None
        since = time.time()
        for ev in registry.events(reg, name):
            if ev.get("step") == "shadow" and ev.get("version") == shadow:
                since = datetime.fromisoformat(ev["at"]).timestamp()
        return shadow, since

    def handle(self, raw: bytes | None, request_id: str) -> str | None:
        """One request: train, register and shadow a candidate. Returns its version, or None
        when the request is skipped (bad, redelivered, or a gate still open)."""
        try:
            req = parse_request(raw, request_id)
        except InvalidMessage as err:
            logger.error("retrain request %s skipped: %s (%s)", request_id, err.reason, err)
            self._event("skipped", request=request_id, why=f"invalid: {err.reason}")
            return None
        if req.model != self._name:
            logger.info(
                "retrain request %s is for model %s, not %s", request_id, req.model, self._name
            )
            return None
        reg = self.settings.registry_dir
        done = [
            e
            for e in registry.events(reg, self._name)
            if e.get("request") == request_id and e.get("step") in ("candidate", "skipped")
        ]
        if done:
            logger.info("retrain request %s already handled (%s)", request_id, done[-1]["step"])
            return None
        gate_open = self.open_gate()
        if gate_open is not None:
            logger.warning(
                "retrain request %s skipped: candidate %s is still in shadow",
                request_id,
                gate_open[0],
            )
            self._event("skipped", request=request_id, why=f"{gate_open[0]} in shadow")
            return None
        self.requests += 1
        champion = registry.current_version(reg, self._name)
        logger.warning("retrain requested (%s, %s); champion %s", req.reason, request_id, champion)
        self._event("requested", champion, request=request_id, reason=req.reason)
        return self._train(req, champion)

    def _train(self, req: RetrainRequest, champion: str | None) -> str | None:
        from stages.shared.feast_store import open_feature_store
        from training.simulate import read_dataset
        from training.train import train

        cfg = self.settings.retrain
        t0 = time.perf_counter()
        tx = read_dataset(self.settings.data_dir)
        known = (
            pd.Timestamp(req.labels_known_ms, unit="ms", tz="UTC")
            if req.labels_known_ms is not None
            else None
        )
        try:
            window = latest_window(tx["tx_datetime"].min(), tx["tx_datetime"].max(), known, cfg)
        except WindowError as exc:
            logger.error("retrain request %s: %s", req.request_id, exc)
            self._event("skipped", request=req.request_id, why=str(exc))
            return None
        # Only the rows the folds, the training and the test window read: labels known.
        tx = tx.loc[tx["tx_datetime"] < window.test_end]
        champion_card = (
            registry.get_version(self.settings.registry_dir, self._name, champion).card
            if champion is not None
            else None
        )
        service = candidate_service(champion_card, self.settings.prediction.feature_service)
        logger.info("training a candidate on %s with %s", window.to_dict(), service)
        result = train(
            self.settings,
            window.train_start,
            cfg.train_days,
            cfg.delay_days,
            cfg.test_days,
            n_folds=window.n_folds,
            store=open_feature_store(self.settings),
            transactions=tx,
            promote=False,
            progress=False,
            n_trials=cfg.n_trials,
            baselines=("logistic_regression",),
            plots=False,
            feature_service=service,
            history_days=cfg.history_days,
        )
        seconds = time.perf_counter() - t0
        version = result.version
        logger.warning(
            "candidate %s registered in %.1f s (offline AP %.4f, AUC %.4f; window %s)",
            version,
            seconds,
            result.metrics.average_precision,
            result.metrics.roc_auc,
            window.to_dict(),
        )
        self._event(
            "candidate",
            version,
            request=req.request_id,
            champion=champion,
            window=window.to_dict(),
            offline={
                "average_precision": result.metrics.average_precision,
                "roc_auc": result.metrics.roc_auc,
            },
            seconds=round(seconds, 2),
        )
        registry.set_shadow(self.settings.registry_dir, self._name, version)
        self._event("shadow", version, champion=champion)
        logger.warning("candidate %s is the shadow of champion %s", version, champion)
        return version

    # -- the gate ----------------------------------------------------------------------------
    def _comparison(self, champion: str | None, candidate: str) -> ShadowComparison | None:
        for c in self.store.comparisons():
            if c.shadow == candidate and c.champion == champion:
                return c
        return None

    def advance_gate(self) -> GateDecision | None:
        """Check the open gate, if any, and act on a decision."""
        gate_open = self.open_gate()
        if gate_open is None:
            return None
        candidate, since = gate_open
        reg, name = self.settings.registry_dir, self._name
        champion = registry.current_version(reg, name)
        try:
            comparison = self._comparison(champion, candidate)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            logger.warning("gate of %s not checked (Redis: %s)", candidate, exc)
            return None
        decision = gate(comparison, self.settings.retrain, time.time() - since)
        if decision.outcome == "wait":
            logger.debug("gate of %s: waiting (%s)", candidate, decision.detail)
            return decision
        details = comparison.to_dict() if comparison else {}
        self._event("gate", candidate, outcome=decision.outcome, detail=decision.detail, **details)
        if decision.outcome == "promote":
            registry.promote(reg, name, candidate)
            registry.set_shadow(reg, name, None)
            self._event("promoted", candidate, previous=champion, detail=decision.detail)
            self.promoted.append(candidate)
            logger.warning("gate passed, %s promoted: %s", candidate, decision.detail)
        else:
            registry.set_shadow(reg, name, None)
            step = "rejected" if decision.outcome == "reject" else "withdrawn"
            self._event(step, candidate, champion=champion, detail=decision.detail)
            logger.warning("gate %s, %s %s: %s", decision.outcome, candidate, step, decision.detail)
        return decision


def run(settings: Settings, stop: StopFlag, max_idle_s: float | None = None) -> RetrainJob:
    """Consume retrain requests and drive the gate until ``stop`` is set."""
    topic = retrain_requests_topic(settings)
    ensure_topics(settings.kafka, settings.topics, [topic])
    # Feast and the training code take seconds to import: pay that before the first request.
    import stages.shared.feast_store  # noqa: F401
    import training.train  # noqa: F401

    job = RetrainJob(settings, comparison_store(settings))
    group = settings.topics.group(settings.retrain.consumer_group)
    consumer = Consumer(
        consumer_config(
            settings.kafka,
            group,
            # Training runs between two polls; on the full data set it takes minutes.
            **{"max.poll.interval.ms": 3_600_000},
        )
    )
    consumer.subscribe([topic])
    logger.info("retrain job: group %s on %s", group, topic)
    next_gate = 0.0
    idle_since = time.monotonic()
    try:
        while not stop.is_set():
            msg: Message | None = consumer.poll(0.5)
            if msg is not None and msg.error() is None:
                idle_since = time.monotonic()
                request_id = where(msg)
                job.handle(msg.value(), request_id)
                try:
                    consumer.commit(message=msg, asynchronous=False)
                except KafkaException as exc:
                    # Redelivered later; the events recognise a handled request.
                    logger.warning("offset of %s not committed: %s", request_id, exc)
                next_gate = 0.0
            elif msg is not None:
                logger.warning("retrain consumer: %s", msg.error())
            now = time.monotonic()
            if now >= next_gate:
                next_gate = now + settings.retrain.gate_poll_s
                job.advance_gate()
            if max_idle_s is not None and now - idle_since > max_idle_s:
                break
    finally:
        consumer.close()
    logger.info("retrain job stopped: %d requests, promoted %s", job.requests, job.promoted)
    return job

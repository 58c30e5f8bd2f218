"""Evaluation stage wiring: ``predictions`` and ``labels`` in (consumer group ``evaluation``),
labels joined to predictions by transaction id, rolling online metrics and drift exported to
Prometheus, retraining requests out on ``model.retrain_requests``.

Where pending predictions wait for their labels: **Redis** (the server the online store
already runs on, with persistence on), one key per transaction with a TTL, and the window of
joined pairs as one capped list. Why this and not the alternatives:

* Labels arrive 7 days (event time, and wall clock in production) after the prediction,
  keyed by *terminal*, while predictions are keyed by *transaction*: the two topics are not
  co-partitioned, so a replica's local state (a quixstreams state store, RocksDB or SQLite
  under ``settings.home``) would hold the prediction while another replica receives the
  label. A store shared by every replica joins regardless of partition assignment.
* It survives restarts and rebalances with nothing to restore (no changelog replay), and the
  rolling window is shared too, so every replica exports the same metric values.
* It is bounded: a prediction waits at most ``pending_ttl_s`` (label delay plus a margin),
  an early label (the pipeline lags) ``orphan_label_ttl_s``, and the window holds
  ``window`` entries. Only ``score|model_version|event_ms`` is kept per prediction.

Each record is applied by one Lua script (atomic): join if the other half waits, else wait;
a joined transaction is marked for ``pending_ttl_s`` so a redelivered record (a batch
replayed after an aborted transaction) is not counted twice. All keys share one hash tag so
the script also runs on Redis Cluster. The drift (PSI) window is per process and in memory:
it is rebuilt from the next ``drift_window`` predictions after a restart. The retraining
cooldown is one ``SET NX EX`` key, so replicas and restarts emit at most one request per
cooldown.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import cast

import orjson
import redis
from confluent_kafka import Message

from stages.evaluation.drift import Drift, DriftWindow, drift_psi, retrain_request, retrain_triggers
from stages.evaluation.join import (
    JoinItem,
    JoinOutcome,
    JoinStore,
    LabelledWindow,
    PredictionRow,
    decode_window,
    label_half,
    prediction_half,
    scored_prediction,
)
from stages.evaluation.metrics import EvaluationMetrics, evaluation_metrics
from stages.evaluation.quality import (
    OnlineMetrics,
    ShadowComparison,
    online_metrics,
    shadow_comparisons,
)
from stages.shared.batch_loop import LoopStats, RetryBatch
from stages.shared.kafka import Output, StopFlag, ensure_topics
from stages.shared.metrics import Metrics, build_metrics
from stages.shared.records import parse_label
from stages.shared.schemas import MODEL_FEATURES, InvalidMessage
from stages.shared.settings import EvaluationSettings, Settings, StageName
from stages.shared.stage_loop import stage_loop
from stages.shared.topology import retrain_requests_topic
from training import registry
from training.reference import Reference, reference_from_card

logger = logging.getLogger(__name__)

STAGE: StageName = "evaluation"

# KEYS: own half, other half, joined marker, window list.
# ARGV: own half value, own TTL, joined-marker TTL, window size, "p" or "l".
# Returns 0 pending, 1 joined, 2 duplicate.
_JOIN_LUA = """
if redis.call('EXISTS', KEYS[3]) == 1 then return 2 end
local other = redis.call('GET', KEYS[2])
if other then
  local entry
  if ARGV[5] == 'p' then entry = ARGV[1] .. '|' .. other else entry = other .. '|' .. ARGV[1] end
  redis.call('LPUSH', KEYS[4], entry)
  redis.call('LTRIM', KEYS[4], 0, tonumber(ARGV[4]) - 1)
  redis.call('DEL', KEYS[1], KEYS[2])
  redis.call('SET', KEYS[3], '1', 'EX', ARGV[3])
  return 1
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return 0
"""
_OUTCOMES: dict[int, JoinOutcome] = {0: "pending", 1: "joined", 2: "duplicate"}


class RedisJoinStore:
    """:class:`~stages.evaluation.join.JoinStore` on Redis (semantics in its docstring)."""

    def __init__(self, client: redis.Redis, namespace: str, cfg: EvaluationSettings) -> None:
        self._client = client
        self._cfg = cfg
        # One hash tag: every key of this namespace lives in one Redis Cluster slot.
        self._prefix = f"rtpipe:eval:{{{namespace}}}:"
        self._script = client.register_script(_JOIN_LUA)

    def key(self, kind: str, tid: int | None = None) -> str:
        return f"{self._prefix}{kind}" if tid is None else f"{self._prefix}{kind}:{tid}"

    def offer(self, items: Sequence[JoinItem]) -> list[JoinOutcome]:
        if not items:
            return []
        cfg = self._cfg
        calls: list[tuple[list[str], list[object]]] = []
        for it in items:
            pred, lab = self.key("p", it.transaction_id), self.key("l", it.transaction_id)
            own, other, ttl = (
                (pred, lab, cfg.pending_ttl_s)
                if it.kind == "prediction"
                else (lab, pred, cfg.orphan_label_ttl_s)
            )
            calls.append(
                (
                    [own, other, self.key("j", it.transaction_id), self.key("window")],
                    [it.half, ttl, cfg.pending_ttl_s, cfg.window, it.kind[0]],
                )
            )
        return [_OUTCOMES[int(cast(int, r))] for r in self._eval_all(calls)]

    def _eval_all(self, calls: Sequence[tuple[list[str], list[object]]]) -> list[object]:
        """The join script once per call, pipelined. EVALSHA goes as a plain command (a
        Redis Cluster pipeline refuses ``evalsha`` and registered scripts); calls a node
        answers NOSCRIPT (restarted, failed over) are redone once after loading the script
        (on every primary), the others are not applied twice."""
        from redis.exceptions import NoScriptError

        from stages.shared.online.cluster import cluster_unavailable, is_cluster_unavailable

        out: list[object] = [None] * len(calls)
        todo = list(range(len(calls)))
        for attempt in (0, 1):
            pipe = self._client.pipeline(transaction=False)
            try:
                for i in todo:
                    keys, args = calls[i]
                    pipe.execute_command("EVALSHA", self._script.sha, len(keys), *keys, *args)
                replies = pipe.execute(raise_on_error=False)
            except redis.ResponseError as exc:
                # A failover (CLUSTERDOWN...) is transient: a ConnectionError, retried.
                if is_cluster_unavailable(exc):
                    raise cluster_unavailable(exc) from exc
                raise
            finally:
                pipe.reset()
            missing = []
            for i, reply in zip(todo, replies, strict=True):
                if isinstance(reply, NoScriptError):
                    missing.append(i)
                elif isinstance(reply, Exception):
                    raise cluster_unavailable(reply) if is_cluster_unavailable(reply) else reply
                else:
                    out[i] = reply
            if not missing:
                return out
            if attempt:
                raise NoScriptError(f"join script still missing after loading it ({len(missing)})")
            self._client.script_load(_JOIN_LUA)
            todo = missing
        raise AssertionError("unreachable")

    def window(self) -> list[str]:
        raw = cast(list[bytes], self._client.lrange(self.key("window"), 0, -1))
        return [r.decode() if isinstance(r, bytes) else str(r) for r in raw]

    def claim_retrain(self, cooldown_s: int, payload: str) -> bool:
        return bool(self._client.set(self.key("retrain"), payload, nx=True, ex=cooldown_s))

    def publish_comparisons(self, comparisons: Sequence[ShadowComparison]) -> None:
        # One hash, field "<champion>|<shadow>"; expires with the pending predictions.
        if not comparisons:
            return
        key = self.key("shadow")
        pipe = self._client.pipeline(transaction=False)
        pipe.hset(
            key,
            mapping={f"{c.champion}|{c.shadow}": orjson.dumps(c.to_dict()) for c in comparisons},
        )
        pipe.expire(key, self._cfg.pending_ttl_s)
        pipe.execute()

    def comparisons(self) -> list[ShadowComparison]:
        raw = cast(dict[bytes, bytes], self._client.hgetall(self.key("shadow")))
        return [ShadowComparison.from_dict(orjson.loads(v)) for v in raw.values()]


@dataclass
class EvaluationStage:
    """Everything the batch handler needs, built once per process."""

    settings: Settings
    store: JoinStore
    metrics: Metrics
    clock: Callable[[], float] = time.monotonic
    drift: DriftWindow = field(init=False)
    last_online: OnlineMetrics | None = field(init=False, default=None)
    last_drift: Drift | None = field(init=False, default=None)
    requests: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        cfg = self.settings.evaluation
        t = self.settings.topics
        self.emetrics: EvaluationMetrics = evaluation_metrics(self.metrics.registry)
        self.drift = DriftWindow(cfg.drift_window, MODEL_FEATURES)
        self._pred_topic = t.name("predictions")
        self._label_topic = t.name("labels")
        self.retrain_topic = retrain_requests_topic(self.settings)
        self._references: dict[str, Reference | None] = {}
        self._next_eval = 0.0
        # Input offered since the metrics were last computed (see on_idle).
        self._stale = False

    # -- the batch handler -------------------------------------------------------------------
    def handle(self, msgs: list[Message]) -> list[Output]:
        """Offer a micro-batch to the join, then (at most every ``metrics_interval_s``)
        recompute the metrics; returns a retraining request when one is due."""
        em = self.emetrics
        self.metrics.messages_in.labels(STAGE).inc(len(msgs))
        self.metrics.batch_size.labels(STAGE).observe(len(msgs))
        items: list[JoinItem] = []
        preds: list[PredictionRow] = []
        for msg in msgs:
            # Bad records are dead-lettered by their owners (routing for predictions,
            # enrichment for labels); here they are only counted.
            try:
                if msg.topic() == self._pred_topic:
                    p = scored_prediction(msg.value())
                    preds.append(p)
                    items.append(JoinItem("prediction", p.transaction_id, prediction_half(p)))
                elif msg.topic() == self._label_topic:
                    lab = parse_label(msg.value())
                    items.append(JoinItem("label", lab.transaction_id, label_half(lab)))
            except InvalidMessage as err:
                kind = "prediction" if msg.topic() == self._pred_topic else "label"
                em.records.labels(kind, f"skipped_{err.reason}").inc()
        try:
            outcomes = self.store.offer(items)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise RetryBatch(f"join_store_unavailable: {exc}", retry_after_s=1.0) from None
        for it, outcome in zip(items, outcomes, strict=True):
            em.records.labels(it.kind, outcome).inc()
        joined = sum(o == "joined" for o in outcomes)
        if joined:
            em.labels_joined.inc(joined)
        self.drift.add(preds)
        self._stale = self._stale or bool(items)
        if not self._due():
            return []
        self._stale = False
        return self.evaluate(emit=True)

    def _due(self) -> bool:
        """Whether the metrics are due (at most every ``metrics_interval_s``); if so, the
        next computation is due one interval from now."""
        now = self.clock()
        if now < self._next_eval:
            return False
        self._next_eval = now + self.settings.evaluation.metrics_interval_s
        return True

    def on_idle(self) -> None:
        """While no input arrives: once due, the metrics (and the champion-versus-shadow
        comparison the retrain gate reads) of what was offered since they were last
        computed. Without it the last batch of a burst that landed within
        ``metrics_interval_s`` of the previous computation waited for the next input (the
        retrain loop test timed out on it under load). No retraining request from here: it
        is emitted inside a batch's transaction, by the next batch."""
        if not self._stale or not self._due():
            return
        try:
            self.compute()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            logger.warning("metrics not computed while idle (Redis: %s); will retry", exc)
            return
        self._stale = False

    # -- metrics, drift and triggers ---------------------------------------------------------
    def reference(self, version: str | None) -> Reference | None:
        """The training reference stored with ``version`` in the registry (cached)."""
        if not version:
            return None
        if version not in self._references:
            ref = None
            try:
                mv = registry.get_version(
                    self.settings.registry_dir, self.settings.prediction.model_name, version
                )
                ref = reference_from_card(mv.card)
            except (registry.RegistryError, ValueError, OSError) as exc:
                logger.warning("model version %s: no registry metadata (%s)", version, exc)
            if ref is None:
                logger.warning("model version %s has no training reference: no PSI", version)
            self._references[version] = ref
        return self._references[version]

    def compute(self) -> tuple[OnlineMetrics | None, Drift | None, LabelledWindow]:
        """Recompute the window metrics and drift, and export them."""
        window = decode_window(self.store.window())
        online = None
        if len(window):
            online = online_metrics(window.is_fraud, window.score, self.settings.routing)
            self.emetrics.set_online(online)
            # Champion vs shadow on the same labelled events: the retrain job's gate.
            comparisons = shadow_comparisons(window)
            if comparisons:
                self.emetrics.set_comparisons(comparisons)
                self.store.publish_comparisons(comparisons)
        drift = None
        ref = self.reference(self.drift.model_version)
        if ref is not None and len(self.drift):
            drift = drift_psi(self.drift, ref)
            self.emetrics.set_drift(drift)
        self.last_online, self.last_drift = online, drift
        return online, drift, window

    def evaluate(self, emit: bool) -> list[Output]:
        """Compute; if a threshold is crossed and the cooldown allows, the request to emit."""
        online, drift, window = self.compute()
        triggers = retrain_triggers(online, drift, self.settings.evaluation)
        if not (emit and triggers):
            return []
        request = retrain_request(
            triggers,
            online,
            drift,
            window,
            model=self.settings.prediction.model_name,
            model_version=self.drift.model_version,
            now_ms=int(time.time() * 1000),
        )
        payload = orjson.dumps(request, option=orjson.OPT_SERIALIZE_NUMPY)
        try:
            claimed = self.store.claim_retrain(
                self.settings.evaluation.retrain_cooldown_s, payload.decode()
            )
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            logger.warning("retrain cooldown not checked (Redis: %s); will retry", exc)
            return []
        if not claimed:
            return []
        reason = triggers[0].reason
        self.emetrics.retrain_requests.labels(reason).inc()
        self.requests += 1
        logger.warning(
            "retraining requested (%s): %s",
            reason,
            ", ".join(
                f"{t.reason}{'[' + t.detail + ']' if t.detail else ''}="
                f"{t.value:.4f} vs {t.threshold}"
                for t in triggers
                if math.isfinite(t.value)
            ),
        )
        self.metrics.messages_out.labels(STAGE, self.retrain_topic).inc()
        key = self.settings.prediction.model_name.encode()
        return [Output(self.retrain_topic, key, payload)]


def redis_client(settings: Settings) -> redis.Redis:
    return settings.redis.client(
        socket_timeout=5.0,
        socket_connect_timeout=2.0,
    )


def build_stage(settings: Settings, metrics: Metrics | None = None) -> EvaluationStage:
    """The stage on the Redis join store, namespaced by the consumer group."""
    namespace = settings.topics.group(settings.evaluation.consumer_group)
    store = RedisJoinStore(redis_client(settings), namespace, settings.evaluation)
    return EvaluationStage(settings=settings, store=store, metrics=metrics or build_metrics())


def run(
    settings: Settings,
    stop: StopFlag,
    metrics: Metrics | None = None,
    *,
    max_idle_s: float | None = None,
) -> LoopStats:
    """Run the evaluation stage until ``stop`` is set (or ``max_idle_s`` without input)."""
    stage = build_stage(settings, metrics)
    ensure_topics(settings.kafka, settings.topics)
    ensure_topics(settings.kafka, settings.topics, [stage.retrain_topic])
    loop = stage_loop(
        settings, stage.metrics, STAGE, stage.handle, settings.evaluation, on_idle=stage.on_idle
    )
    stats = loop.run(stop, max_idle_s=max_idle_s)
    # Export the state as of the last batch (no request: there is no transaction left).
    try:
        stage.compute()
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        logger.warning("final metrics not computed: %s", exc)
    return stats

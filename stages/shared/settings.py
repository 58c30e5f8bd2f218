"""One frozen settings object per process, read from ``RTPIPE_*`` environment variables.

Nested groups use ``__`` as the delimiter, e.g. ``RTPIPE_KAFKA__BOOTSTRAP_SERVERS`` or
``RTPIPE_PREDICTION__MAX_BATCH``. Build it once in ``main()`` and pass it down.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:
    import redis

StageName = Literal["enrichment", "prediction", "routing", "evaluation"]

_FROZEN = ConfigDict(frozen=True, extra="forbid")


class KafkaSettings(BaseModel):
    """How every Kafka client (producer, consumer, admin, quixstreams) connects."""

    model_config = _FROZEN

    bootstrap_servers: str = "127.0.0.1:9092"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_ca_location: Path | None = None
    ssl_certificate_location: Path | None = None
    ssl_key_location: Path | None = None
    ssl_key_password: SecretStr | None = None
    # The longest a consumer's fetch waits at the broker when there is no new data. Data
    # (or, for read_committed readers, a commit) answers a waiting fetch at once, so this
    # does not add latency; lower values only multiply idle fetch requests.
    fetch_wait_max_ms: int = Field(default=100, ge=1)
    # Overlap each exactly-once commit's round trips with the work in front of them: a batch
    # loop begins the transaction and sends its input offsets (AddOffsetsToTxn and
    # TxnOffsetCommit, two coordinator round trips) on a worker thread while its handler
    # runs, and the enrichment stage writes the online store while the checkpoint flushes
    # the producer. Off: one after the other, as before (the bench measures both).
    overlap_commit: bool = True

    def client_config(self) -> dict[str, str]:
        """librdkafka connection properties shared by every client."""
        conf: dict[str, str] = {
            "bootstrap.servers": self.bootstrap_servers,
            "security.protocol": self.security_protocol,
        }
        if self.sasl_mechanism:
            conf["sasl.mechanism"] = self.sasl_mechanism
        if self.sasl_username:
            conf["sasl.username"] = self.sasl_username
        if self.sasl_password:
            conf["sasl.password"] = self.sasl_password.get_secret_value()
        if self.ssl_ca_location:
            conf["ssl.ca.location"] = str(self.ssl_ca_location)
        if self.ssl_certificate_location:
            conf["ssl.certificate.location"] = str(self.ssl_certificate_location)
        if self.ssl_key_location:
            conf["ssl.key.location"] = str(self.ssl_key_location)
        if self.ssl_key_password:
            conf["ssl.key.password"] = self.ssl_key_password.get_secret_value()
        return conf


class RedisSettings(BaseModel):
    """The Redis server behind Feast's online store."""

    model_config = _FROZEN

    host: str = "127.0.0.1"
    port: int = 6379
    db: int = 0
    # An ACL user (Redis 6+); None authenticates as ``default`` (``requirepass``).
    username: str | None = None
    password: SecretStr | None = None
    ssl: bool = False
    # With ``ssl``: the CA the server's certificate must chain to (None: the system's), and
    # a client certificate and key for servers that require one (``tls-auth-clients yes``).
    ssl_ca_location: Path | None = None
    ssl_certificate_location: Path | None = None
    ssl_key_location: Path | None = None
    # Redis Cluster (Feast's ``redis_cluster`` online store): ``host:port`` is one startup
    # node; ``startup_nodes`` (comma-separated ``host:port``) adds more, so a client still
    # finds the cluster when that one node is down.
    cluster: bool = False
    startup_nodes: str = ""

    def nodes(self) -> list[tuple[str, int]]:
        """Every startup node, ``host:port`` first, without repeats."""
        out = [(self.host, self.port)]
        for part in self.startup_nodes.split(","):
            if part.strip():
                host, _, port = part.strip().rpartition(":")
                if (host, int(port)) not in out:
                    out.append((host, int(port)))
        return out

    def connection_options(self) -> dict[str, Any]:
        """redis-py connection keywords for the credentials and TLS (every client, and
        Feast's connection string, carry the same)."""
        opts: dict[str, Any] = {
            "username": self.username,
            "password": self.password.get_secret_value() if self.password else None,
            "ssl": self.ssl,
        }
        if self.ssl:
            # Always verified: the server's certificate must chain to the CA and name the host.
            opts["ssl_cert_reqs"] = "required"
            opts["ssl_check_hostname"] = True
            if self.ssl_ca_location:
                opts["ssl_ca_certs"] = str(self.ssl_ca_location)
            if self.ssl_certificate_location:
                opts["ssl_certfile"] = str(self.ssl_certificate_location)
            if self.ssl_key_location:
                opts["ssl_keyfile"] = str(self.ssl_key_location)
        return opts

    def client(self, **options: Any) -> redis.Redis:
        """A redis-py client for this server; ``options`` (timeouts, retry) are passed on.

        With ``cluster`` on it is a ``redis.cluster.RedisCluster`` (same commands, keys routed
        by hash slot); the online reader and writer batch per node over it
        (``stages/shared/online/cluster.py``, ``transport.py``).
        """
        import redis as redis_py

        if self.cluster:
            from redis.cluster import ClusterNode, RedisCluster

            cluster: Any = RedisCluster(
                startup_nodes=[ClusterNode(h, p) for h, p in self.nodes()],
                **self.connection_options(),
                **options,
            )
            return cast("redis.Redis", cluster)
        return redis_py.Redis(
            host=self.host, port=self.port, db=self.db, **self.connection_options(), **options
        )

    def feast_connection_string(self) -> str:
        """Connection string in the form Feast's Redis online store expects (for a cluster:
        every startup node, no ``db``: a cluster has only database 0).

        Feast splits it on commas and passes each ``key=value`` to redis-py's client as a
        keyword, so the credentials and TLS options are the same as :meth:`client`'s.

        Raises:
            ValueError: a value contains a comma (Feast would split it).
        """
        if self.cluster:
            parts = [f"{h}:{p}" for h, p in self.nodes()]
        else:
            parts = [f"{self.host}:{self.port}", f"db={self.db}"]
        for key, value in self.connection_options().items():
            if value is None or value is False:
                continue
            text = "true" if value is True else str(value)
            if "," in text:
                raise ValueError(f"RTPIPE_REDIS: {key} contains a comma, which Feast cannot parse")
            parts.append(f"{key}={text}")
        return ",".join(parts)


class TopicSettings(BaseModel):
    """Topic names (DESIGN.md contracts); ``prefix`` is prepended to every one."""

    model_config = _FROZEN

    prefix: str = ""
    transactions: str = "transactions"
    labels: str = "labels"
    enriched: str = "transactions.enriched"
    predictions: str = "predictions"
    action: str = "decisions.action"
    review: str = "decisions.review"
    approved: str = "decisions.approved"
    dlq_suffix: str = ".dlq"
    partitions: int = Field(default=4, ge=1)
    replication_factor: int = Field(default=1, ge=1)
    # Time-based retention compares against the *event* timestamps the messages carry; a
    # replay of 2018 events would be deleted on arrival (and quixstreams copies this setting
    # to its repartition topics). -1 keeps data until retention_bytes, or forever.
    retention_ms: int = -1
    retention_bytes: int = -1

    def name(self, key: str) -> str:
        """Full name of a topic by its field name, e.g. ``name("enriched")``."""
        return f"{self.prefix}{getattr(self, key)}"

    def dlq(self, topic: str) -> str:
        """Dead-letter topic of a full topic name."""
        return f"{topic}{self.dlq_suffix}"

    def group(self, group_id: str) -> str:
        """Consumer group id under the same prefix, so prefixed pipelines are isolated."""
        return f"{self.prefix}{group_id}"

    def decision_topics(self) -> tuple[str, str, str]:
        return (self.name("action"), self.name("review"), self.name("approved"))

    def all_topics(self) -> list[str]:
        """Every topic the pipeline owns, DLQs included."""
        base = [self.name(k) for k in ("transactions", "labels", "enriched", "predictions")]
        return [
            *base,
            *self.decision_topics(),
            *(self.dlq(t) for t in base),
        ]


class StackSettings(BaseModel):
    """The local single-machine stack started by ``rtpipe stack up``."""

    model_config = _FROZEN

    kafka_version: str = "4.1.1"
    kafka_port: int = 9092
    kafka_controller_port: int = 9093
    kafka_heap: str = "1g"
    # Extra JVM options of every broker the stack starts, space-separated (after the heap
    # and the collector, so they can override them).
    kafka_jvm_opts: str = ""
    redis_port: int = 6379
    prometheus_port: int = 9090
    # Cluster mode (``rtpipe stack up --brokers 3 --redis-cluster``). With kafka_brokers > 1,
    # a KRaft quorum of that many combined broker/controller nodes: node i (0-based) serves on
    # kafka_port + i * node_port_step (controller: kafka_controller_port + i * step).
    kafka_brokers: int = Field(default=1, ge=1, le=9)
    node_port_step: int = Field(default=100, ge=2)
    # A Redis Cluster of redis_cluster_masters masters with one replica each, on ports
    # redis_port .. redis_port + 2 * masters - 1.
    redis_cluster: bool = False
    redis_cluster_masters: int = Field(default=3, ge=3)
    # Secure mode (``rtpipe stack up --secure``): Kafka's client listener speaks SASL_SSL
    # (SCRAM-SHA-512) and Redis only TLS with ACL users; the stack makes the CA, the
    # certificates and the passwords under run/secure/ (infra/stack/secure.py).
    secure: bool = False
    # Where Maven resolves Kafka's jars; shared across checkouts on purpose.
    cache_dir: Path = Path.home() / ".cache" / "rtpipe"


class EnrichmentSettings(BaseModel):
    model_config = _FROZEN

    # The customer windows run in this group (quixstreams); the labels process, off the
    # event path, keeps the label index that terminal windows are computed from in its own
    # group and process.
    consumer_group: str = "enrichment"
    labels_consumer_group: str = "enrichment-labels"
    labels_max_batch: int = Field(default=2000, ge=1)
    # The labels process commits its Kafka transaction (dead letters, offsets) at most this
    # often; the label index itself is written as each batch arrives.
    labels_commit_interval_ms: int = Field(default=200, ge=0)
    # How long labels are kept behind a terminal's newest: the 37 days a terminal window
    # spans, plus 30 days for events that arrive late.
    label_retention_ms: int = Field(default=67 * 86_400_000, ge=37 * 86_400_000)
    # The longest a quixstreams checkpoint stays open under load: a checkpoint also commits
    # as soon as the input is drained (NaturalBatchingApplication), so at live rates an
    # event's outputs are committed right after it is processed. Under load each checkpoint
    # costs a producer flush and a transaction the broker shares the two cores for: at
    # max speed on fresh processes 200 ms against 50 ms measured medians of 4,421 against
    # 3,224 events/s (1.37x), and p99 at 1,000 events/s 176 against 158 ms (0.90x: an event
    # that meets a burst waits for the longer checkpoint). `rtpipe bench` runs both.
    commit_interval_s: float = Field(default=0.2, gt=0)
    # How long one fetch waits for more messages. quixstreams' time-aligned reads fetch with
    # consume(10_000, timeout), which returns only when 10,000 messages are in or the timeout
    # passes: its 1 s default put 1-2 s in front of every event at live rates.
    poll_timeout_ms: int = Field(default=2, ge=1)
    processing_guarantee: Literal["exactly-once", "at-least-once"] = "exactly-once"
    # Events older than this (event time) behind the customer's newest are late.
    grace_ms: int = Field(default=60_000, ge=0)
    # A transaction id seen again within this much of its customer's event time is a
    # duplicate (not counted, no second outcome) or, with other content, a
    # conflicting_duplicate (DLQ). At least the longest window (30 days).
    dedup_horizon_ms: int = Field(default=31 * 86_400_000, ge=30 * 86_400_000, le=2**32)
    # Events stamped more than this ahead of the wall clock go to the DLQ (future_event);
    # None accepts any future time.
    max_clock_skew_ms: int | None = Field(default=3_600_000, ge=0)
    state_dir: Path | None = None
    # The customer app's loop turns every poll (milliseconds) even when idle, and nothing
    # in it may block longer than its Kafka transaction may stay open (30 s; the Feast sink's
    # retries stop at 20 s). When it has not turned for this long outside state recovery,
    # the stage starts again as a new process. Measured after a broker of three was killed:
    # quixstreams' checkpoint commit blocked in librdkafka's send_offsets_to_transaction for
    # good, holding its partitions and their RocksDB locks, so neither it nor the replica
    # they moved to made progress.
    loop_watchdog_s: float = Field(default=40.0, gt=0)


class PredictionSettings(BaseModel):
    model_config = _FROZEN

    consumer_group: str = "prediction"
    max_batch: int = Field(default=500, ge=1)
    # After a batch's first event, how long to wait for more. 0: take what is fetched
    # (batches grow by themselves under load, while the previous one commits); a 5 ms wait
    # cost each exactly-once hop 5 ms at 200 events/s (three bare hops, p50 27 -> 10 ms).
    max_wait_ms: int = Field(default=0, ge=0)
    # How long a batch may wait for the label index to reach its events' time (terminal
    # windows are exact only then); past it the batch is served with the labels indexed so
    # far and counted in rtpipe_enrichment_inexact_windows_total{view="terminal_risk"}.
    label_wait_max_ms: int = Field(default=30_000, ge=0)
    model_name: str = "fraud"
    feature_service: str = "fraud_model_v1"
    # How often the registry is polled for a newly promoted version.
    reload_interval_s: float = Field(default=5.0, gt=0)
    # Redis down: "pause" stops consuming until it is back (backpressure); "review" routes
    # the batch to decisions.review with reason features_unavailable.
    on_features_unavailable: Literal["pause", "review"] = "pause"
    # Optional shadow model version scored on the same batches (logged, never routed).
    shadow_version: str | None = None
    # Canary: this fraction of transactions, chosen by a stable hash of the transaction id,
    # is scored (and routed) on the candidate version instead of the promoted one.
    canary_version: str | None = None
    canary_fraction: float = Field(default=0.0, ge=0.0, le=1.0)


class RoutingSettings(BaseModel):
    model_config = _FROZEN

    consumer_group: str = "routing"
    max_batch: int = Field(default=1000, ge=1)
    max_wait_ms: int = Field(default=0, ge=0)
    # score >= action_threshold -> action; >= review_threshold -> review; else approved.
    action_threshold: float = Field(default=0.5, ge=0, le=1)
    review_threshold: float = Field(default=0.2, ge=0, le=1)
    # Features older than this (seconds of event time) route to review.
    max_feature_age_s: float = Field(default=86_400.0, gt=0)


class EvaluationSettings(BaseModel):
    """Online evaluation: delayed-label join, rolling metrics, drift, retraining requests."""

    model_config = _FROZEN

    consumer_group: str = "evaluation"
    max_batch: int = Field(default=2000, ge=1)
    max_wait_ms: int = Field(default=100, ge=0)
    # Labelled predictions the rolling metrics are computed over (newest first).
    window: int = Field(default=20_000, ge=10)
    # Predictions kept for the drift (PSI) window, per process.
    drift_window: int = Field(default=10_000, ge=10)
    # Recompute metrics at most this often (0: after every batch, for tests).
    metrics_interval_s: float = Field(default=5.0, ge=0)
    # A prediction waits this long (wall clock) for its label: label delay plus a margin.
    pending_ttl_s: int = Field(default=10 * 86_400, ge=1)
    # A label that arrives before its prediction (the pipeline lags) waits this long.
    orphan_label_ttl_s: int = Field(default=3_600, ge=1)
    # Minimum sample sizes before a metric may trigger a retraining request.
    min_labelled: int = Field(default=500, ge=1)
    min_flagged: int = Field(default=20, ge=1)
    min_predictions: int = Field(default=1_000, ge=1)
    # Triggers: PSI above (score or any feature), precision at the action threshold or ROC
    # AUC below their floors.
    psi_threshold: float = Field(default=0.2, gt=0)
    feature_psi_threshold: float = Field(default=0.2, gt=0)
    precision_floor: float = Field(default=0.5, ge=0, le=1)
    auc_floor: float = Field(default=0.8, ge=0, le=1)
    # At most one retraining request per cooldown (shared by replicas through Redis).
    retrain_cooldown_s: int = Field(default=6 * 3_600, ge=1)
    retrain_topic: str = "model.retrain_requests"


class RetrainSettings(BaseModel):
    """The retrain job (``rtpipe retrain``): requests in, candidate trained on the latest
    window, served as shadow, promoted when the gate passes (stages/retrain/)."""

    model_config = _FROZEN

    consumer_group: str = "retrain"
    # The protocol's windows (days): train, label gap, test; the test window ends where the
    # request says labels are known.
    train_days: int = Field(default=7, ge=1)
    delay_days: int = Field(default=7, ge=0)
    test_days: int = Field(default=7, ge=1)
    # LightGBM search (training.tune): configurations tried and validation folds (at most as
    # many as the data before the training window holds).
    n_trials: int = Field(default=6, ge=1)
    n_folds: int = Field(default=3, ge=1)
    # Lengths of fitting history (days ending with the training window) the folds choose from
    # (training.tune.search_history; `rtpipe train` tries 7, 14, 28 and 42). The default fits
    # on the training window only: each longer length is one more cross-validation before the
    # candidate can be served.
    history_days: tuple[Annotated[int, Field(ge=1)], ...] = Field(default=(7,), min_length=1)
    # The gate: decided once the champion and the candidate have scored this many labelled
    # events (with at least min_frauds frauds) side by side; the candidate is promoted if its
    # average precision is at least the champion's minus ap_tolerance.
    min_labelled: int = Field(default=2_000, ge=10)
    min_frauds: int = Field(default=20, ge=1)
    ap_tolerance: float = Field(default=0.0, ge=0, le=1)
    # A candidate whose gate has not been decided by then is withdrawn.
    gate_timeout_s: float = Field(default=3 * 86_400.0, gt=0)
    gate_poll_s: float = Field(default=5.0, gt=0)


OfflineStoreKind = Literal["file", "spark"]


class FeastSettings(BaseModel):
    """Which Feast offline store builds training sets (point-in-time joins), and its Spark
    session when that is Spark. The registry, the Parquet folders and the online store are the
    same either way; materialization into the online store always reads through the file store.
    """

    model_config = _FROZEN

    # file: Feast's Dask store on this machine; spark: Feast's Spark store (pyspark, extra
    # ``spark``) over the same Parquet folders, in local mode or on the master given below.
    offline_store: OfflineStoreKind = "file"
    # local[N] runs Spark inside this process's JVM with N cores (the same SQL as on a
    # cluster); spark://host:7077, yarn, k8s://... send the join to a cluster.
    spark_master: str = "local[2]"
    # Heap of the Spark driver (in local mode: of the whole Spark JVM).
    spark_driver_memory: str = "2g"
    # Shuffle partitions of the join; Spark's default 200 is for clusters and costs seconds of
    # task overhead per query on a small machine.
    spark_shuffle_partitions: int = Field(default=4, ge=1)
    # Any further Spark conf keys (JSON object in RTPIPE_FEAST__SPARK_CONF), applied last.
    spark_conf: dict[str, str] = Field(default_factory=dict)


class MetricsSettings(BaseModel):
    model_config = _FROZEN

    host: str = "127.0.0.1"
    enrichment_port: int = 8001
    prediction_port: int = 8002
    routing_port: int = 8003
    evaluation_port: int = 8004
    # The enrichment stage's terminal-window process.
    enrichment_labels_port: int = 8005

    def port(self, stage: StageName) -> int:
        return int(getattr(self, f"{stage}_port"))

    def ports(self, stage: StageName) -> tuple[int, ...]:
        """Every port a stage's processes serve metrics on (enrichment runs two)."""
        if stage == "enrichment":
            return (self.enrichment_port, self.enrichment_labels_port)
        return (self.port(stage),)


class Settings(BaseSettings):
    """Everything a process needs; build once in ``main()``."""

    model_config = SettingsConfigDict(
        env_prefix="RTPIPE_", env_nested_delimiter="__", frozen=True, extra="ignore"
    )

    home: Path = Path(".rtpipe")
    feature_repo: Path = Path("feature_repo")
    feast_project: str = "rtpipe"
    max_message_bytes: int = Field(default=64 * 1024, ge=256)
    log_level: str = "INFO"
    # This process's stable identity within its consumer group (a replica number, a pod's
    # ordinal). Set, it is the group.instance.id (static membership: a restarted instance
    # takes its partitions back without a rebalance) and names the transactional.id (the
    # restart aborts what the dead instance left open, instead of readers waiting for the
    # transaction timeout). Two live processes of one stage must not share it. Unset: a new
    # dynamic member and transactional id per process.
    instance_id: str | None = None
    # An assigned partition with lag that has not moved for this long, while the stage's
    # dependencies were up, is stalled: counted, logged and re-read (stages/shared/stall.py).
    stall_timeout_s: float = Field(default=60.0, gt=0)
    # A stage process (``rtpipe run``) whose batch loop has not turned for this long starts
    # again as a new process (stages/shared/watchdog.py); 0 never. Longer than the longest
    # turn the loop's own timeouts allow (a send_offsets or init_transactions of 30 s, a 10 s
    # commit attempt, a bounded 20 s consumer close: each beats the watchdog when it returns).
    stage_watchdog_s: float = Field(default=60.0, ge=0)

    def instance_name(self, group_id: str) -> str | None:
        """The static member / transactional id of this process in ``group_id``."""
        return f"{group_id}-{self.instance_id}" if self.instance_id else None

    kafka: KafkaSettings = KafkaSettings()
    redis: RedisSettings = RedisSettings()
    topics: TopicSettings = TopicSettings()
    stack: StackSettings = StackSettings()
    enrichment: EnrichmentSettings = EnrichmentSettings()
    prediction: PredictionSettings = PredictionSettings()
    routing: RoutingSettings = RoutingSettings()
    evaluation: EvaluationSettings = EvaluationSettings()
    retrain: RetrainSettings = RetrainSettings()
    metrics: MetricsSettings = MetricsSettings()
    feast: FeastSettings = FeastSettings()

    @property
    def data_dir(self) -> Path:
        """Simulated data set (raw transactions and labels)."""
        return self.home / "data"

    @property
    def registry_dir(self) -> Path:
        """Model registry: one folder per model version."""
        return self.home / "registry"

    @property
    def run_dir(self) -> Path:
        """Stack state: PID files, logs, Kafka and Redis data."""
        return self.home / "run"

    @property
    def offline_dir(self) -> Path:
        """Feast offline store (Parquet); FileSource paths are relative to the repo."""
        return self.feature_repo / "data"


def settings_to_env(settings: Settings) -> dict[str, str]:
    """``RTPIPE_*`` variables that rebuild ``settings`` in a child process (stages started by
    the demo, tests and chaos runs)."""
    env: dict[str, str] = {}

    def put(prefix: str, value: object) -> None:
        if value is None:
            return
        if isinstance(value, BaseModel):
            for name in type(value).model_fields:
                put(f"{prefix}__{name.upper()}", getattr(value, name))
            return
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if isinstance(value, bool):
            value = "true" if value else "false"
        if isinstance(value, dict | list | tuple):
            # pydantic-settings parses a complex field's variable as JSON.
            value = json.dumps(value)
        env[prefix] = str(value)

    for name in Settings.model_fields:
        put(f"RTPIPE_{name.upper()}", getattr(settings, name))
    return env


def on_port_base(settings: Settings, base: int) -> Settings:
    """``settings`` moved onto a stack of its own: Kafka on ``base + 92`` (controller +93),
    Redis +379, Prometheus +90, the stages' metrics +1..+5. The test and bench stacks use
    this layout so that they run beside the default stack and beside each other."""
    return settings.model_copy(
        update={
            "kafka": KafkaSettings(bootstrap_servers=f"127.0.0.1:{base + 92}"),
            "redis": RedisSettings(port=base + 379),
            "stack": settings.stack.model_copy(
                update={
                    "kafka_port": base + 92,
                    "kafka_controller_port": base + 93,
                    "redis_port": base + 379,
                    "prometheus_port": base + 90,
                }
            ),
            "metrics": MetricsSettings(
                enrichment_port=base + 1,
                prediction_port=base + 2,
                routing_port=base + 3,
                evaluation_port=base + 4,
                enrichment_labels_port=base + 5,
            ),
        }
    )


def on_cluster(
    settings: Settings, *, kafka_port: int, redis_port: int, brokers: int = 3
) -> Settings:
    """``settings`` moved onto a cluster stack: ``brokers`` Kafka nodes from ``kafka_port``
    (controllers +1, one node every ``stack.node_port_step`` ports), a Redis Cluster from
    ``redis_port``, and topics replicated on three brokers (or all, when fewer)."""
    step = settings.stack.node_port_step
    stack = settings.stack.model_copy(
        update={
            "kafka_brokers": brokers,
            "kafka_port": kafka_port,
            "kafka_controller_port": kafka_port + 1,
            "redis_port": redis_port,
            "redis_cluster": True,
        }
    )
    masters = stack.redis_cluster_masters
    return settings.model_copy(
        update={
            "kafka": settings.kafka.model_copy(
                update={
                    "bootstrap_servers": ",".join(
                        f"127.0.0.1:{kafka_port + i * step}" for i in range(brokers)
                    )
                }
            ),
            "redis": settings.redis.model_copy(
                update={
                    "host": "127.0.0.1",
                    "port": redis_port,
                    "db": 0,
                    "cluster": True,
                    "startup_nodes": ",".join(
                        f"127.0.0.1:{redis_port + i}" for i in range(1, masters)
                    ),
                }
            ),
            "topics": settings.topics.model_copy(update={"replication_factor": min(3, brokers)}),
            "stack": stack,
        }
    )

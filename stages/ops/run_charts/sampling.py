"""Sampling a run: each stage's ``/metrics`` scraped into frames (:class:`Frame`) by a
:class:`MetricsSampler` thread, and the consumer groups' lag as Kafka reports it
(:class:`KafkaLagProbe`)."""

from __future__ import annotations

import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from stages.shared.settings import Settings, StageName
from stages.shared.topology import STAGES, stage_groups

logger = logging.getLogger(__name__)

SeriesKey = tuple[str, tuple[tuple[str, str], ...]]
# Sampled metrics (a sample of everything would grow with every label of every stage).
DEFAULT_METRICS = (
    "rtpipe_messages_in_total",
    "rtpipe_messages_out_total",
    "rtpipe_consumer_lag_messages",
    "rtpipe_event_to_decision_seconds_bucket",
    "rtpipe_decisions_total",
)
# Lag as measured by :class:`KafkaLagProbe` (frames of the probe carry only this series).
KAFKA_LAG = "rtpipe_group_lag_messages"


@dataclass(frozen=True, slots=True)
class Frame:
    """One scrape of one stage: wall-clock time, whether it answered, its samples."""

    t: float
    stage: str
    up: bool
    samples: dict[SeriesKey, float] = field(default_factory=dict)


def parse_metrics(text: str, names: Iterable[str] = DEFAULT_METRICS) -> dict[SeriesKey, float]:
    """Samples of the wanted metric names from a Prometheus text exposition."""
    wanted = set(names)
    out: dict[SeriesKey, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in wanted:
                out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return out


class KafkaLagProbe:
    """Consumer lag of each stage's group read from Kafka itself: high watermark minus the
    group's committed offset, summed over the input partitions.

    The stages' own ``rtpipe_consumer_lag_messages`` comes from librdkafka statistics, which
    only know offsets the consumer stored or committed itself; offsets committed through a
    producer transaction are not among them, so the broker is asked instead. The probe never
    joins the groups (``committed()`` only queries the coordinator).
    """

    def __init__(self, settings: Settings, stages: Sequence[StageName] = STAGES) -> None:
        from confluent_kafka import Consumer

        self._settings = settings
        # (stage, group) -> the group's input topics; one probe consumer per group.
        self._topics = {
            (stage, group): topics
            for stage in stages
            for group, topics in stage_groups(settings, stage).items()
        }
        self._consumers = {
            key: Consumer(
                {
                    **settings.kafka.client_config(),
                    "group.id": key[1],
                    "enable.auto.commit": False,
                }
            )
            for key in self._topics
        }
        self._partitions: dict[tuple[StageName, str], list[Any]] = {}

    def _parts(self, key: tuple[StageName, str]) -> list[Any]:
        from confluent_kafka import TopicPartition

        if not self._partitions.get(key):
            consumer = self._consumers[key]
            parts: list[Any] = []
            for topic in self._topics[key]:
                meta = consumer.list_topics(topic, timeout=5).topics.get(topic)
                if meta is not None and meta.error is None:
                    parts.extend(TopicPartition(topic, p) for p in meta.partitions)
            self._partitions[key] = parts
        return self._partitions[key]

    def poll(self, timeout_s: float = 2.0) -> list[Frame]:
        from confluent_kafka import KafkaException

        lags: dict[str, float] = {}
        failed: set[str] = set()
        for (stage, group), consumer in self._consumers.items():
            try:
                committed = consumer.committed(self._parts((stage, group)), timeout=timeout_s)
                lag = 0
                for tp in committed:
                    _, high = consumer.get_watermark_offsets(tp, timeout=timeout_s, cached=False)
                    lag += max(0, high - tp.offset) if tp.offset >= 0 else high
            except KafkaException as exc:
                logger.debug("lag of %s (%s) unavailable: %s", stage, group, exc)
                failed.add(stage)
                continue
            lags[stage] = lags.get(stage, 0.0) + lag
        # A stage's lag is the sum over its groups, or nothing if one could not be read.
        lags = {stage: lag for stage, lag in lags.items() if stage not in failed}
        now = time.time()
        return [
            Frame(now, stage, True, {(KAFKA_LAG, (("stage", stage),)): lag})
            for stage, lag in lags.items()
        ]

    def close(self) -> None:
        for consumer in self._consumers.values():
            consumer.close()
        self._consumers.clear()


class MetricsSampler:
    """Polls each stage's ``/metrics`` every ``interval_s`` in a daemon thread.

    Args:
        urls: stage name -> metrics URL, e.g. ``{"routing": "http://127.0.0.1:8003/metrics"}``,
            or a tuple of URLs for a stage of several processes (their samples are summed).
        interval_s: time between polls.
        names: metric sample names kept (default :data:`DEFAULT_METRICS`).
        timeout_s: HTTP timeout per scrape; a stage that does not answer gives ``up=False``.
    """

    def __init__(
        self,
        urls: Mapping[str, str | tuple[str, ...]],
        interval_s: float = 1.0,
        names: Iterable[str] = DEFAULT_METRICS,
        timeout_s: float = 2.0,
        lag_probe: KafkaLagProbe | None = None,
    ) -> None:
        self.urls = {k: (v,) if isinstance(v, str) else tuple(v) for k, v in urls.items()}
        self.lag_probe = lag_probe
        self.interval_s = interval_s
        self.names = tuple(names)
        self.timeout_s = timeout_s
        self._frames: list[Frame] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def for_stages(
        cls,
        settings: Settings,
        stages: Sequence[StageName] = STAGES,
        interval_s: float = 1.0,
        kafka_lag: bool = True,
    ) -> MetricsSampler:
        """A sampler of the stages' endpoints as configured in ``settings.metrics`` and, with
        ``kafka_lag``, of their consumer groups' lag as Kafka reports it."""
        m = settings.metrics
        probe = KafkaLagProbe(settings, stages) if kafka_lag else None
        urls: dict[str, str | tuple[str, ...]] = {
            s: tuple(f"http://{m.host}:{p}/metrics" for p in m.ports(s)) for s in stages
        }
        return cls(urls, interval_s, lag_probe=probe)

    def poll_once(self) -> list[Frame]:
        """Scrape every URL once and keep the frames."""
        frames = []
        for stage, urls in self.urls.items():
            now = time.time()
            samples: dict[SeriesKey, float] = {}
            up = True
            for url in urls:
                try:
                    with urllib.request.urlopen(url, timeout=self.timeout_s) as resp:
                        text = resp.read().decode()
                except (urllib.error.URLError, OSError) as exc:
                    logger.debug("metrics of %s at %s unavailable: %s", stage, url, exc)
                    up = False
                    break
                for key, value in parse_metrics(text, self.names).items():
                    samples[key] = samples.get(key, 0.0) + value
            frames.append(Frame(now, stage, True, samples) if up else Frame(now, stage, False))
        if self.lag_probe is not None:
            frames.extend(self.lag_probe.poll(self.timeout_s))
        with self._lock:
            self._frames.extend(frames)
        return frames

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            self.poll_once()
            self._stop.wait(max(0.0, self.interval_s - (time.monotonic() - started)))

    def start(self) -> MetricsSampler:
        if self._thread is not None:
            raise RuntimeError("sampler already started")
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="metrics-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> list[Frame]:
        """Stop polling (after one last scrape) and return the frames."""
        if self._thread is not None:
            self._stop.set()
            n_urls = sum(len(u) for u in self.urls.values())
            self._thread.join(self.timeout_s * n_urls + self.interval_s + 1)
            self._thread = None
            self.poll_once()
        if self.lag_probe is not None:
            self.lag_probe.close()
            self.lag_probe = None
        return self.frames()

    def frames(self) -> list[Frame]:
        with self._lock:
            return list(self._frames)

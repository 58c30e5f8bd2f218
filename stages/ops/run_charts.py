"""The run report of a demo or replay: PNG charts of throughput, latency percentiles and
consumer lag over the run (sampled from each stage's ``/metrics`` endpoint while it runs) and
the decision mix (from the audit).

Usage::

    sampler = MetricsSampler.for_stages(settings, interval_s=1.0)
    sampler.start()
    ...  # replay, wait for outcomes
    sampler.stop()
    paths = render_run_report(settings, audit_report, out_dir, sampler.frames())
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from stages.shared.settings import Settings, StageName
from stages.shared.topology import STAGES, stage_groups

if TYPE_CHECKING:
    from matplotlib.axes import Axes

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
STAGE_COLOURS = {
    "enrichment": "#4C72B0",
    "prediction": "#DD8452",
    "routing": "#55A868",
    "evaluation": "#8172B3",
}
# Lag as measured by :class:`KafkaLagProbe` (frames of the probe carry only this series).
KAFKA_LAG = "rtpipe_group_lag_messages"
DECISION_COLOURS = {"action": "#C44E52", "review": "#DD8452", "approved": "#55A868"}


# --- sampling --------------------------------------------------------------------------------
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


# --- series from frames ----------------------------------------------------------------------
def _by_stage(frames: Sequence[Frame], name: str) -> dict[str, list[Frame]]:
    """Per stage, in time order, the frames that hold samples of ``name``."""
    out: dict[str, list[Frame]] = {}
    for f in sorted(frames, key=lambda f: f.t):
        if f.up and any(n == name for n, _ in f.samples):
            out.setdefault(f.stage, []).append(f)
    return out


def _total(f: Frame, name: str) -> float:
    return sum(v for (n, _), v in f.samples.items() if n == name)


def _increase(prev: float, cur: float) -> float:
    """Counter increase between two scrapes; a drop means the process restarted."""
    return cur if cur < prev else cur - prev


def rate_series(
    frames: Sequence[Frame], name: str, t0: float
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per stage: (seconds since ``t0``, per-second rate of the counter ``name`` summed over
    its labels), one point per pair of consecutive scrapes."""
    out = {}
    for stage, fs in _by_stage(frames, name).items():
        ts, rates = [], []
        for a, b in itertools.pairwise(fs):
            dt = b.t - a.t
            if dt <= 0:
                continue
            ts.append(b.t - t0)
            rates.append(_increase(_total(a, name), _total(b, name)) / dt)
        if ts:
            out[stage] = (np.asarray(ts), np.asarray(rates))
    return out


def gauge_series(
    frames: Sequence[Frame], name: str, t0: float
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per stage: (seconds since ``t0``, the gauge ``name`` summed over its labels)."""
    out = {}
    for stage, fs in _by_stage(frames, name).items():
        pts = [(f.t - t0, _total(f, name)) for f in fs]
        if pts:
            out[stage] = (np.asarray([p[0] for p in pts]), np.asarray([p[1] for p in pts]))
    return out


def _buckets(f: Frame, name: str) -> dict[float, float]:
    out: dict[float, float] = {}
    for (n, labels), v in f.samples.items():
        if n == name:
            le = dict(labels).get("le")
            if le is not None:
                bound = float("inf") if le in ("+Inf", "inf") else float(le)
                out[bound] = out.get(bound, 0.0) + v
    return out


def _top_bound(frames: Sequence[Frame], name: str) -> float | None:
    for f in frames:
        finite = [b for b in _buckets(f, name) if np.isfinite(b)]
        if finite:
            return max(finite)
    return None


def histogram_quantile(q: float, bounds: np.ndarray, cumulative: np.ndarray) -> float:
    """Prometheus' ``histogram_quantile``: linear interpolation inside the bucket holding the
    rank; NaN without observations; the highest finite bound if the rank is in ``+Inf``."""
    total = cumulative[-1] if len(cumulative) else 0.0
    if total <= 0:
        return float("nan")
    rank = q * total
    i = int(np.searchsorted(cumulative, rank, side="left"))
    i = min(i, len(bounds) - 1)
    if np.isinf(bounds[i]):
        return float(bounds[i - 1]) if i > 0 else float("nan")
    lo_bound = bounds[i - 1] if i > 0 else 0.0
    lo_count = cumulative[i - 1] if i > 0 else 0.0
    in_bucket = cumulative[i] - lo_count
    if in_bucket <= 0:
        return float(bounds[i])
    return float(lo_bound + (bounds[i] - lo_bound) * (rank - lo_count) / in_bucket)


def quantile_series(
    frames: Sequence[Frame],
    name: str,
    quantiles: Sequence[float],
    t0: float,
    stage: str = "routing",
) -> tuple[np.ndarray, dict[float, np.ndarray]]:
    """Quantiles of a histogram's observations *between* consecutive scrapes of one stage."""
    fs = _by_stage(frames, name).get(stage, [])
    ts: list[float] = []
    values: dict[float, list[float]] = {q: [] for q in quantiles}
    for a, b in itertools.pairwise(fs):
        ba, bb = _buckets(a, name), _buckets(b, name)
        if not bb:
            continue
        bounds = np.asarray(sorted(bb))
        cum = np.asarray([_increase(ba.get(k, 0.0), bb[k]) for k in bounds])
        cum = np.maximum.accumulate(cum)
        if cum[-1] <= 0:
            continue
        ts.append(b.t - t0)
        for q in quantiles:
            values[q].append(histogram_quantile(q, bounds, cum))
    return np.asarray(ts), {q: np.asarray(v) for q, v in values.items()}


# --- the report ------------------------------------------------------------------------------
class TopicLike(Protocol):
    count: int
    reasons: Counter[str]
    latency_ms: list[int]


class AuditLike(Protocol):
    """What :func:`render_run_report` reads of :class:`stages.ops.audit.AuditReport`."""

    expected: int
    lost: list[int]
    duplicated: list[int]

    @property
    def per_topic(self) -> Mapping[str, TopicLike]: ...

    def latency_percentiles(self) -> dict[str, float]: ...

    def throughput(self) -> float | None: ...


def _empty(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="grey")
    ax.set_xticks([])
    ax.set_yticks([])


def _in_stage_order(
    series: dict[str, tuple[np.ndarray, np.ndarray]],
) -> list[tuple[str, tuple[np.ndarray, np.ndarray]]]:
    order: dict[str, int] = {s: i for i, s in enumerate(STAGES)}
    return sorted(series.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0]))


def _t0(frames: Sequence[Frame]) -> float:
    return min((f.t for f in frames), default=0.0)


def plot_throughput(ax: Axes, frames: Sequence[Frame]) -> None:
    series = rate_series(frames, "rtpipe_messages_in_total", _t0(frames))
    ax.set_title("Throughput: messages consumed per second")
    if not series:
        _empty(ax, "no metric samples")
        return
    for stage, (t, r) in _in_stage_order(series):
        ax.plot(t, r, label=stage, color=STAGE_COLOURS.get(stage), lw=1.8)
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("messages / s")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", frameon=False)


def plot_latency(ax: Axes, frames: Sequence[Frame], report: AuditLike | None) -> None:
    qs = (0.5, 0.95, 0.99)
    t, values = quantile_series(frames, "rtpipe_event_to_decision_seconds_bucket", qs, _t0(frames))
    ax.set_title("Event-to-decision latency (per sampling interval)")
    if not len(t):
        _empty(ax, "no latency samples")
        return
    styles = {0.5: ("p50", "#4C72B0"), 0.95: ("p95", "#DD8452"), 0.99: ("p99", "#C44E52")}
    for q in qs:
        label, colour = styles[q]
        ax.plot(t, values[q] * 1000, label=label, color=colour, lw=1.8, marker=".", ms=4)
    overall = report.latency_percentiles() if report is not None else {}
    if overall:
        ax.axhline(
            overall["p95_ms"],
            color="#DD8452",
            ls="--",
            lw=1,
            alpha=0.8,
            label=f"p95 whole run: {overall['p95_ms']:,.0f} ms",
        )
        ax.set_title(
            "Event-to-decision latency (per sampling interval)\n"
            f"whole run (audit): p50 {overall['p50_ms']:,.0f} ms, "
            f"p95 {overall['p95_ms']:,.0f} ms, p99 {overall['p99_ms']:,.0f} ms",
            fontsize=11,
        )
    cap = _top_bound(frames, "rtpipe_event_to_decision_seconds_bucket")
    if cap is not None and any(np.any(v >= cap) for v in values.values()):
        # Quantiles in the +Inf bucket read as the top bound: the real values are higher.
        ax.axhline(cap * 1000, color="grey", ls=":", lw=1, label=f"histogram limit {cap:g} s")
    finite = np.concatenate([v[np.isfinite(v)] for v in values.values()] or [np.empty(0)])
    if finite.size and finite.max() / max(finite.min(), 1e-6) > 50:
        ax.set_yscale("log")
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("ms (histogram buckets, interpolated)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="best", frameon=True, framealpha=0.9, fontsize=9)


def plot_lag(ax: Axes, frames: Sequence[Frame]) -> None:
    t0 = _t0(frames)
    series = gauge_series(frames, KAFKA_LAG, t0) or gauge_series(
        frames, "rtpipe_consumer_lag_messages", t0
    )
    ax.set_title("Consumer lag (messages behind, all input partitions)")
    if not series:
        _empty(ax, "no consumer lag samples")
        return
    for stage, (t, lag) in _in_stage_order(series):
        ax.plot(t, lag, label=stage, color=STAGE_COLOURS.get(stage), lw=1.8, drawstyle="steps-post")
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("messages behind")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", frameon=False)


def _short(settings: Settings, topic: str) -> str:
    t = settings.topics
    names = {t.name(k): k for k in ("action", "review", "approved")}
    for k in ("transactions", "labels", "enriched", "predictions"):
        names[t.dlq(t.name(k))] = f"dlq: {getattr(t, k)}"
    return names.get(topic, topic)


def plot_decisions(ax: Axes, settings: Settings, report: AuditLike) -> None:
    rows = [(_short(settings, topic), rec) for topic, rec in report.per_topic.items()]
    rows = [(n, r) for n, r in rows if r.count or n in DECISION_COLOURS]
    total = sum(r.count for _, r in rows) or 1
    ax.set_title(f"Decision mix ({total:,} outcomes)")
    names = [n for n, _ in rows][::-1]
    counts = [r.count for _, r in rows][::-1]
    colours = [DECISION_COLOURS.get(n, "#8C8C8C") for n in names]
    bars = ax.barh(names, counts, color=colours)
    for bar, (_name, rec) in zip(bars, rows[::-1], strict=True):
        top = ", ".join(f"{k} {v:,}" for k, v in rec.reasons.most_common(2))
        ax.annotate(
            f" {rec.count:,} ({rec.count / total:.1%})  {top}",
            xy=(bar.get_width(), bar.get_y() + bar.get_height() / 2),
            va="center",
            fontsize=8,
        )
    positive = [c for c in counts if c > 0]
    if positive and max(positive) / min(positive) > 50:
        # Actions are rare next to approvals: a log scale keeps every bar visible.
        ax.set_xscale("log")
        ax.set_xlim(0.8, max(positive) * 40)
    else:
        ax.set_xlim(0, max([*counts, 1]) * 1.9)
    ax.set_xlabel("records")
    ax.spines[["top", "right"]].set_visible(False)


def render_run_report(
    settings: Settings,
    report: AuditLike | None,
    out_dir: Path,
    frames: Sequence[Frame] | None = None,
    *,
    title: str = "rtpipe run",
) -> list[Path]:
    """Write the run's charts as PNGs.

    Args:
        settings: the run's settings (topic names for the decision mix).
        report: the audit of the run (decision mix, whole-run latency); None to skip those.
        out_dir: created if missing.
        frames: :meth:`MetricsSampler.frames` of the run; None or empty gives charts that
            say there were no samples.
        title: heading of the overview.

    Returns:
        Paths of ``overview.png``, ``throughput.png``, ``latency.png``, ``lag.png`` and, with
        a report, ``decisions.png``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frames = list(frames or [])
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []

    def save(fig: plt.Figure, name: str) -> None:
        path = out_dir / name
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)

    fig, axes = plt.subplots(2, 2, figsize=(14, 8.5))
    plot_throughput(axes[0, 0], frames)
    plot_latency(axes[0, 1], frames, report)
    plot_lag(axes[1, 0], frames)
    if report is not None:
        plot_decisions(axes[1, 1], settings, report)
    else:
        _empty(axes[1, 1], "no audit report")
    heading = title
    if report is not None:
        tput = report.throughput()
        heading += (
            f": {report.expected:,} events, lost {len(report.lost)}, "
            f"duplicated {len(report.duplicated)}" + (f", {tput:,.0f} decisions/s" if tput else "")
        )
    fig.suptitle(heading, fontsize=13)
    fig.tight_layout()
    save(fig, "overview.png")

    for name, draw in (
        ("throughput.png", lambda ax: plot_throughput(ax, frames)),
        ("latency.png", lambda ax: plot_latency(ax, frames, report)),
        ("lag.png", lambda ax: plot_lag(ax, frames)),
    ):
        fig, ax = plt.subplots(figsize=(9, 4.5))
        draw(ax)
        fig.tight_layout()
        save(fig, name)
    if report is not None:
        fig, ax = plt.subplots(figsize=(9, 4.5))
        plot_decisions(ax, settings, report)
        fig.tight_layout()
        save(fig, "decisions.png")
    logger.info("run report: %s", ", ".join(str(p) for p in paths))
    return paths


def render_live_latency(rows: np.ndarray, out_dir: Path, *, title: str = "live-rate phase") -> Path:
    """Per-second p50 / p99 of event-to-decision latency in a fixed-rate phase.

    Args:
        rows: ``(n, 5)`` int64 per decision: ingest, enriched, predicted, routed and visible
            wall-clock ms (:meth:`stages.ops.latency.Decisions.of`).
        out_dir: created if missing; the picture is ``live_latency.png``.
        title: heading.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(10, 4.5))
    if len(rows):
        second = (rows[:, 0] - rows[:, 0].min()) // 1000
        total = rows[:, 4] - rows[:, 0]
        xs, p50, p99, n = [], [], [], []
        for s_ in np.unique(second):
            lat = total[second == s_]
            xs.append(int(s_))
            p50.append(float(np.percentile(lat, 50)))
            p99.append(float(np.percentile(lat, 99)))
            n.append(len(lat))
        ax.plot(xs, p50, marker=".", label="p50")
        ax.plot(xs, p99, marker=".", label="p99")
        ax.set_ylim(bottom=0)
        ax.set_xlabel("second of the phase (by ingest time)")
        ax.set_ylabel("event -> decision visible (ms)")
        ax.legend(loc="upper right")
        ax.set_title(f"{title}: {len(rows):,} decisions, {np.mean(n):,.0f}/s")
    else:
        ax.text(0.5, 0.5, "no decisions", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title)
    ax.grid(alpha=0.3)
    path = out_dir / "live_latency.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path

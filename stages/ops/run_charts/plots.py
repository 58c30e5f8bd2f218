"""The run report's PNGs (throughput, latency percentiles and consumer lag over the run, the
decision mix from the audit) and the per-second latency of a live-rate phase."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from stages.ops.run_charts.sampling import KAFKA_LAG, Frame
from stages.ops.run_charts.series import gauge_series, quantile_series, rate_series, top_bound
from stages.shared.settings import Settings
from stages.shared.topology import STAGES

if TYPE_CHECKING:
    from matplotlib.axes import Axes

logger = logging.getLogger(__name__)

STAGE_COLOURS = {
    "enrichment": "#4C72B0",
    "prediction": "#DD8452",
    "routing": "#55A868",
    "evaluation": "#8172B3",
}
DECISION_COLOURS = {"action": "#C44E52", "review": "#DD8452", "approved": "#55A868"}


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
    cap = top_bound(frames, "rtpipe_event_to_decision_seconds_bucket")
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

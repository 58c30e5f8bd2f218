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

from stages.ops.run_charts.plots import (
    DECISION_COLOURS,
    STAGE_COLOURS,
    AuditLike,
    TopicLike,
    plot_decisions,
    plot_lag,
    plot_latency,
    plot_throughput,
    render_live_latency,
    render_run_report,
)
from stages.ops.run_charts.sampling import (
    DEFAULT_METRICS,
    KAFKA_LAG,
    Frame,
    KafkaLagProbe,
    MetricsSampler,
    SeriesKey,
    parse_metrics,
)
from stages.ops.run_charts.series import (
    gauge_series,
    histogram_quantile,
    quantile_series,
    rate_series,
    top_bound,
)

__all__ = [
    "DECISION_COLOURS",
    "DEFAULT_METRICS",
    "KAFKA_LAG",
    "STAGE_COLOURS",
    "AuditLike",
    "Frame",
    "KafkaLagProbe",
    "MetricsSampler",
    "SeriesKey",
    "TopicLike",
    "gauge_series",
    "histogram_quantile",
    "parse_metrics",
    "plot_decisions",
    "plot_lag",
    "plot_latency",
    "plot_throughput",
    "quantile_series",
    "rate_series",
    "render_live_latency",
    "render_run_report",
    "top_bound",
]

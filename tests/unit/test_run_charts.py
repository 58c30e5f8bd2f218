"""Run report: series from sampled frames (rates, histogram quantiles) and the PNGs."""

from __future__ import annotations

import socket
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import generate_latest

from stages.ops.audit import AuditReport, TopicRecords
from stages.ops.run_charts import (
    Frame,
    MetricsSampler,
    gauge_series,
    histogram_quantile,
    parse_metrics,
    quantile_series,
    rate_series,
    render_run_report,
)
from stages.shared.metrics import build_metrics
from stages.shared.settings import Settings

BOUNDS = (0.01, 0.05, 0.1, 0.5, float("inf"))


def frame(t: float, stage: str, messages: float, lag: float, buckets: list[float]) -> Frame:
    samples = {
        ("rtpipe_messages_in_total", (("stage", stage),)): messages,
        ("rtpipe_consumer_lag_messages", (("partition", "0"), ("stage", stage))): lag,
        ("rtpipe_consumer_lag_messages", (("partition", "1"), ("stage", stage))): lag / 2,
    }
    for le, c in zip(BOUNDS, buckets, strict=True):
        key = "+Inf" if le == float("inf") else str(le)
        samples[("rtpipe_event_to_decision_seconds_bucket", (("le", key),))] = c
    return Frame(t, stage, True, samples)


def synthetic_frames(n: int = 60) -> list[Frame]:
    """A minute of a run: throughput ramps up and down, latency and lag peak mid-run."""
    frames = []
    msgs = {"enrichment": 0.0, "prediction": 0.0, "routing": 0.0}
    cum = np.zeros(len(BOUNDS))
    rng = np.random.default_rng(0)
    for i in range(n):
        load = 1000 * np.sin(np.pi * i / n) + 200
        lat = rng.lognormal(np.log(0.02 + 0.2 * np.sin(np.pi * i / n) ** 4), 0.5, int(load))
        cum += np.array([(lat <= b).sum() for b in BOUNDS])
        for k, stage in enumerate(msgs):
            msgs[stage] += load * (1 - 0.05 * k)
            lag = max(0.0, 3000 * np.sin(np.pi * i / n) ** 6 - 200 * k)
            frames.append(frame(float(i), stage, msgs[stage], lag, cum.tolist()))
    frames.append(Frame(30.5, "evaluation", False))  # a stage that did not answer
    return frames


def audit_report(settings: Settings) -> AuditReport:
    t = settings.topics
    per_topic = {
        t.name("action"): TopicRecords(t.name("action"), 420, reasons=Counter(score_high=420)),
        t.name("review"): TopicRecords(
            t.name("review"), 2_310, reasons=Counter(low_confidence=2_000, missing_features=310)
        ),
        t.name("approved"): TopicRecords(
            t.name("approved"), 61_000, reasons=Counter(score_low=61_000)
        ),
        t.dlq(t.name("transactions")): TopicRecords(
            t.dlq(t.name("transactions")), 7, reasons=Counter(not_json=5, too_large=2)
        ),
        t.dlq(t.name("predictions")): TopicRecords(t.dlq(t.name("predictions")), 0),
    }
    lat = np.random.default_rng(1).lognormal(np.log(30), 0.6, 2_000).astype(int).tolist()
    per_topic[t.name("approved")].latency_ms = lat
    per_topic[t.name("approved")].first_ingest_ms = 1_000
    per_topic[t.name("approved")].last_routed_ms = 61_000
    return AuditReport(63_730, per_topic, lost=[], duplicated=[], unexpected=[])


def test_histogram_quantile_by_hand() -> None:
    bounds = np.array([0.1, 0.2, 0.4, np.inf])
    cum = np.array([10.0, 30.0, 40.0, 40.0])
    # rank 20 is halfway through the (0.1, 0.2] bucket
    assert histogram_quantile(0.5, bounds, cum) == pytest.approx(0.15)
    # rank 4 in the first bucket, interpolated from 0
    assert histogram_quantile(0.1, bounds, cum) == pytest.approx(0.04)
    # rank in +Inf: the highest finite bound
    assert histogram_quantile(0.99, bounds, np.array([10.0, 30.0, 38.0, 40.0])) == 0.4
    assert np.isnan(histogram_quantile(0.5, bounds, np.zeros(4)))


def test_rates_gauges_and_quantiles_from_frames() -> None:
    frames = [
        frame(100.0, "routing", 0, 10, [0, 0, 0, 0, 0]),
        frame(102.0, "routing", 200, 30, [10, 20, 20, 20, 20]),
        # restarted process: the counter starts over
        frame(103.0, "routing", 50, 0, [10, 20, 20, 20, 20]),
    ]
    t, r = rate_series(frames, "rtpipe_messages_in_total", 100.0)["routing"]
    assert t.tolist() == [2.0, 3.0]
    assert r.tolist() == [100.0, 50.0]
    t, lag = gauge_series(frames, "rtpipe_consumer_lag_messages", 100.0)["routing"]
    assert lag.tolist() == [15.0, 45.0, 0.0]  # summed over partitions
    t, q = quantile_series(frames, "rtpipe_event_to_decision_seconds_bucket", [0.5], 100.0)
    # between the first two scrapes: 10 in (0, 0.01], 10 in (0.01, 0.05]: median 0.01
    assert t.tolist()[0] == 2.0
    assert q[0.5][0] == pytest.approx(0.01)


def test_parse_metrics_reads_the_stage_exposition() -> None:
    m = build_metrics()
    m.messages_in.labels("routing").inc(5)
    m.event_to_decision.observe(0.03)
    samples = parse_metrics(generate_latest(m.registry).decode())
    assert samples[("rtpipe_messages_in_total", (("stage", "routing"),))] == 5
    assert samples[("rtpipe_event_to_decision_seconds_bucket", (("le", "0.05"),))] == 1
    assert all(name.startswith("rtpipe_") for name, _ in samples)


def test_sampler_polls_a_live_endpoint() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    m = build_metrics()
    m.serve("127.0.0.1", port)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    sampler = MetricsSampler(
        {
            "routing": f"http://127.0.0.1:{port}/metrics",
            "prediction": f"http://127.0.0.1:{dead}/metrics",
        },
        interval_s=0.05,
    ).start()
    m.messages_in.labels("routing").inc(3)
    time.sleep(0.4)
    frames = sampler.stop()
    up = [f for f in frames if f.stage == "routing"]
    assert len(up) >= 3 and all(f.up for f in up)
    assert up[-1].samples[("rtpipe_messages_in_total", (("stage", "routing"),))] == 3
    assert [f.up for f in frames if f.stage == "prediction"] == [False] * (len(frames) - len(up))


def test_sampler_sums_the_processes_of_one_stage() -> None:
    ports = []
    registries = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
        m = build_metrics()
        m.serve("127.0.0.1", ports[-1])
        registries.append(m)
    registries[0].messages_in.labels("enrichment").inc(5)
    registries[1].messages_out.labels("enrichment", "transactions.enriched").inc(4)
    registries[1].messages_in.labels("enrichment").inc(2)
    sampler = MetricsSampler(
        {"enrichment": tuple(f"http://127.0.0.1:{p}/metrics" for p in ports)}, interval_s=0.05
    )
    (frame,) = sampler.poll_once()
    assert frame.up
    assert frame.samples[("rtpipe_messages_in_total", (("stage", "enrichment"),))] == 7
    key = (
        "rtpipe_messages_out_total",
        (("stage", "enrichment"), ("topic", "transactions.enriched")),
    )
    assert frame.samples[key] == 4


def test_render_run_report_writes_pngs(tmp_path: Path) -> None:
    settings = Settings()
    paths = render_run_report(settings, audit_report(settings), tmp_path, synthetic_frames())
    assert [p.name for p in paths] == [
        "overview.png",
        "throughput.png",
        "latency.png",
        "lag.png",
        "decisions.png",
    ]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert p.stat().st_size > 10_000


def test_render_without_samples_or_report(tmp_path: Path) -> None:
    paths = render_run_report(Settings(), None, tmp_path, [])
    assert [p.name for p in paths] == ["overview.png", "throughput.png", "latency.png", "lag.png"]
    assert all(p.stat().st_size > 0 for p in paths)

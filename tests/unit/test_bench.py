"""Pure parts of the benchmark (bench/): medians, ratios, goals, the results table, the
per-stage latency statistics and the naive consumer's per-message scoring. No timings are
asserted: the machine is shared and noisy."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pandas as pd
import pytest

from bench.naive import NaiveScorer
from bench.pipeline import decision_stats, plans
from bench.results import Goal, Machine, Results, Row, fmt_number, markdown_table, median, ratio
from stages.shared.schemas import CUSTOMER_FEATURES, MODEL_FEATURES, TERMINAL_FEATURES


def test_median_and_ratio_directions() -> None:
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert math.isnan(median([]))
    assert ratio(200.0, 100.0, "higher") == 2.0  # events/s: more is better
    assert ratio(5.0, 50.0, "lower") == 10.0  # milliseconds: less is better
    assert math.isnan(ratio(0.0, 10.0))
    assert math.isnan(ratio(float("nan"), 10.0))


def test_goals_on_ratio_and_on_ours() -> None:
    assert Goal(">= 10x", min_ratio=10.0).met(1.0, 12.0) is True
    assert Goal(">= 10x", min_ratio=10.0).met(1.0, 9.9) is False
    assert Goal("< 100 ms", max_ours=100.0).met(80.0, float("nan")) is True
    assert Goal("< 100 ms", max_ours=100.0).met(120.0, float("nan")) is False
    assert Goal("").met(1.0, 2.0) is None
    assert Goal(">= 5x", min_ratio=5.0).met(1.0, float("nan")) is None


def test_row_ratio_and_table() -> None:
    read = Row("read | batch 500", 5.0, 60.0, "ms", better="lower", goal=Goal(">= 10x", 10.0))
    p99 = Row("p99", 140.0, None, "ms", better="lower", goal=Goal("< 100 ms", max_ours=100.0))
    assert read.ratio == 12.0 and read.met is True
    assert math.isnan(p99.ratio) and p99.met is False
    table = markdown_table([read, p99]).splitlines()
    assert table[0] == "| what | ours | baseline | ratio | goal | met? |"
    assert table[2] == "| read \\| batch 500 | 5 ms | 60.0 ms | 12x | >= 10x | yes |"
    assert table[3] == "| p99 | 140 ms | - | n/a | < 100 ms | **no** |"


def test_number_formatting() -> None:
    assert fmt_number(212_658.4, "ev/s") == "212,658 ev/s"
    assert fmt_number(42.25) == "42.2"
    assert fmt_number(0.3123, "ms") == "0.312 ms"
    assert fmt_number(float("nan")) == "n/a"
    assert fmt_number(None) == "n/a"


def test_results_markdown_records_command_machine_and_goals() -> None:
    res = Results("rtpipe bench --quick", Machine(2, 23.5, (1.0, 2.0, 3.0), "3.11", "Linux"))
    res.rows = [
        Row("a", 2.0, 1.0, "ev/s", goal=Goal(">= 1x", min_ratio=1.0)),
        Row("b", 1.0, 2.0, "ev/s", goal=Goal(">= 1x", min_ratio=1.0)),
        Row("c", 1.0, None, "ms"),
    ]
    res.sections["Where"] = "body"
    text = res.markdown()
    assert "`rtpipe bench --quick`" in text
    assert "2 cores, 23.5 GB RAM, load average at start 1.00 / 2.00 / 3.00" in text
    assert "Goals met: 1 of 2." in text
    assert text.endswith("## Where\n\nbody\n")


def test_decision_stats_per_hop() -> None:
    # ingest, enriched, predicted, routed, visible (ms)
    ts = np.array([[1_000, 1_050, 1_060, 1_070, 1_090], [2_000, 2_100, 2_120, 2_130, 2_140]])
    st = decision_stats(ts)
    assert st["events"] == 2
    assert st["eps"] == 2 / 1.14
    assert st["ingest -> enriched p50"] == 75.0
    assert st["predicted -> routed p99"] == 10.0
    assert st["routed -> visible p50"] == 15.0
    assert st["ingest -> visible (total) p50"] == 115.0
    assert decision_stats(np.empty((0, 5), dtype=np.int64)) == {"events": 0.0}


def test_plans_are_consecutive_windows_of_the_asked_sizes() -> None:
    t0 = pd.Timestamp("2018-04-09", tz="UTC")
    tx = pd.DataFrame({"tx_datetime": t0 + pd.to_timedelta(np.arange(100), unit="min")})
    first, second = plans(tx, t0, [10, 30])
    assert first.start == t0 and first.end == second.start
    inside = lambda p: int(((tx.tx_datetime >= p.start) & (tx.tx_datetime < p.end)).sum())  # noqa: E731
    assert (inside(first), inside(second)) == (10, 30)
    # The last window ends on the last transaction (exclusive): 99 fit after t0, not 100.
    assert inside(plans(tx, t0, [40, 59])[1]) == 59
    with pytest.raises(ValueError, match=r"100 transactions asked for .* holds 99"):
        plans(tx, t0, [40, 60])


class FakeOnline:
    def __init__(self) -> None:
        self.calls: list[list[dict[str, Any]]] = []

    def get_online_features(self, features: Any, entity_rows: list[dict[str, Any]]) -> Any:
        self.calls.append(entity_rows)
        values: dict[str, list[Any]] = {f: [1.5] for f in (*CUSTOMER_FEATURES, *TERMINAL_FEATURES)}
        values["terminal_risk_1d"] = [None]

        class Response:
            def to_dict(self) -> dict[str, list[Any]]:
                return values

        return Response()


class FakeModel:
    def __init__(self) -> None:
        self.rows: list[list[float]] = []

    def predict(self, data: Any, **kwargs: Any) -> Any:
        self.rows.extend(data)
        return [0.25]


def test_naive_scorer_one_message() -> None:
    online, model = FakeOnline(), FakeModel()
    scorer = NaiveScorer(online, "fraud_model_v1", model, MODEL_FEATURES)
    saturday_night = int(pd.Timestamp("2018-04-07 03:00", tz="UTC").value // 1_000_000)
    msg = json.dumps(
        {
            "transaction_id": 42,
            "customer_id": 7,
            "terminal_id": 9,
            "amount": 12.5,
            "event_ms": saturday_night,
            "ts": {"ingest_ms": 1, "enriched_ms": 2},
        }
    ).encode()
    key, value = scorer.score(msg)
    assert key == b"42"
    assert online.calls == [[{"customer_id": 7, "terminal_id": 9}]]
    (row,) = model.rows
    assert row[:3] == [12.5, 1, 1]  # amount, is_weekend, is_night
    assert math.isnan(row[MODEL_FEATURES.index("terminal_risk_1d")])
    out = json.loads(value)
    assert out["transaction_id"] == 42 and out["score"] == 0.25
    assert out["ts"]["ingest_ms"] == 1 and out["ts"]["predicted_ms"] > 2


def test_scale_out_rows_compare_the_cluster_with_the_single_node_and_two_processes_with_one() -> (
    None
):
    from bench.cluster import ScaleRun
    from bench.run import scale_rows, scale_section

    total = "ingest -> visible (total)"

    def run(name: str, n: int, eps: float, p99: float) -> ScaleRun:
        return ScaleRun(
            name, n, {"eps": eps, "events": 6_000.0}, {"eps": 499.0, f"{total} p99": p99}
        )

    rows = scale_rows(
        [
            run("single node", 1, 3_000, 80),
            run("cluster", 1, 1_500, 160),
            run("cluster", 2, 1_800, 120),
        ]
    )
    by = {r.what: r for r in rows}
    vs_single = "process(es) per stage vs single node:"
    one = by[f"cluster stack, 1 {vs_single} events/s at max speed (6,000 events)"]
    assert one.ratio == 0.5  # the cluster has half the single node's events/s
    p99 = by[f"cluster stack, 2 {vs_single} event-to-decision p99 at 200 events/s"]
    assert (p99.ours, p99.baseline) == (120, 80) and p99.ratio == 80 / 120
    assert by["cluster stack, 2 processes per stage vs 1: events/s at max speed"].ratio == 1.2
    table = scale_section([run("single node", 1, 3_000, 80), run("cluster", 2, 1_800, 120)])
    assert "| cluster | 2 | 1,800 |" in table and "| single node | 1 | 3,000 |" in table


def test_checkpoint_rows_compare_the_current_interval_with_the_old_one_by_medians() -> None:
    from bench.pipeline import CHECKPOINT_INTERVALS_S, Phase, PipelineResults
    from bench.run import checkpoint_rows, latency_section

    total = "ingest -> visible (total)"
    old, new = CHECKPOINT_INTERVALS_S

    def sets(eps: list[float], p99: list[float], ms: int = 200) -> list[list[Phase]]:
        return [
            [
                Phase(f"max speed, checkpoint {ms} ms", None, {"eps": e, "events": 20_000.0}),
                Phase(f"1,000 events/s, checkpoint {ms} ms", 1_000.0, {f"{total} p99": p}),
            ]
            for e, p in zip(eps, p99, strict=True)
        ]

    res = PipelineResults(
        3_000.0,
        400_000.0,
        [],
        checkpoint_sets={
            old: sets([1_000, 3_000], [90, 110], 50),
            new: sets([3_000, 5_000], [80, 120]),
        },
    )
    eps, p99 = checkpoint_rows(res)
    assert (eps.ours, eps.baseline, eps.ratio) == (4_000, 2_000, 2.0)
    assert "median of 2" in eps.note and "3,000, 5,000 vs 1,000, 3,000" in eps.note
    assert (p99.ours, p99.baseline, p99.ratio) == (100, 100, 1.0)  # lower is better: 100 / 100
    assert f"{new * 1000:.0f} ms vs {old * 1000:.0f} ms" in eps.what
    section = latency_section(res)
    assert section.count("checkpoint 200 ms") == 4 and section.count("checkpoint 50 ms") == 4
    # Without both sets (a partial run) there is nothing to compare.
    assert (
        checkpoint_rows(PipelineResults(1.0, 1.0, [], checkpoint_sets={new: sets([1], [1])})) == []
    )


def test_warmup_rows_compare_each_fixed_rate_with_the_first_pass_of_the_warm_up() -> None:
    from bench.pipeline import Phase, PipelineResults
    from bench.run import warmup_rows, warmup_section

    total = "ingest -> visible (total)"

    def ph(name: str, rate: float | None, p50: float, p99: float, jit: float) -> Phase:
        stats = {f"{total} p50": p50, f"{total} p99": p99, "broker jit cores": jit, "eps": 9.0}
        return Phase(name, rate, stats)

    warmup = [
        ph("max speed, pass 1, broker warm-up", None, 900, 1_900, 0.4),
        ph("1,000 events/s, pass 1, broker warm-up", 1_000.0, 300, 1_000, 0.4),
        ph("200 events/s, pass 1, broker warm-up", 200.0, 100, 300, 0.35),
        ph("1,000 events/s, pass 2, broker warm-up", 1_000.0, 120, 260, 0.05),
    ]
    main = [
        ph("max speed", None, 800, 1_500, 0.02),
        ph("1,000 events/s", 1_000.0, 150, 250, 0.03),
        ph("200 events/s", 200.0, 50, 100, 0.01),
        ph("50% of max", 1_234.0, 90, 200, 0.01),
    ]
    rows = warmup_rows(PipelineResults(1.0, 1.0, main, warmup=warmup))
    # Fixed rates the first pass also ran, p50 and p99; never against pass 2, never max speed.
    assert [(r.what.split(":")[0], r.ours, r.baseline) for r in rows] == [
        ("event-to-decision p50 at 1,000 events/s", 150, 300),
        ("event-to-decision p99 at 1,000 events/s", 250, 1_000),
        ("event-to-decision p50 at 200 events/s", 50, 100),
        ("event-to-decision p99 at 200 events/s", 100, 300),
    ]
    assert rows[1].ratio == 4.0 and rows[1].note == "broker JIT 0.03 vs 0.4 cores"
    assert warmup_rows(PipelineResults(1.0, 1.0, main)) == []
    section = warmup_section(PipelineResults(1.0, 1.0, main, warmup=warmup))
    assert section.count("broker warm-up |") == 4 and "| 50% of max |" in section

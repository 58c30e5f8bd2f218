"""Input as ordinary producers write it (issue #11), through the three stages on the real
broker and Redis: retries without idempotence, no key, another customer's key, the id as a
JSON string, the default CRC32 partitioner, a conflicting copy, a copy naming another
customer, and a duplicate after a restart of the enrichment stage.

Each chosen transaction is its customer's only one in the window (after 30 days of warm-up
history), so the outcome does not depend on how the re-keyed copies interleave: the audit
must show exactly one outcome per transaction id, and the served features must equal the
batch definitions computed on the de-duplicated, correctly keyed transactions.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import orjson
import pandas as pd
import pytest
from confluent_kafka import Producer

from stages.enrichment.intake import REKEYED_HEADER
from stages.ops.audit import audit, read_topic
from stages.ops.harness.processes import start_stage, start_stages, stop_stages
from stages.ops.harness.readiness import wait_until_ready
from stages.ops.harness.sandbox import isolated_settings, register_tiny_model
from stages.ops.replay import ReplayPlan, replay
from stages.shared.feast_store import apply_repo
from stages.shared.kafka import DLQ_REASON, ensure_topics
from stages.shared.schemas import MODEL_FEATURES
from stages.shared.settings import Settings
from training.features import compute_features
from training.simulate import SimulatorConfig, simulate

pytestmark = pytest.mark.integration

START = pd.Timestamp("2018-05-05", tz="UTC")
PER_CASE = 6
CASES = ("twice", "no_key", "other_key", "string_key", "crc32", "conflict", "restart", "moved")


def _value(row: pd.Series, **override: object) -> bytes:
    rec = {
        "transaction_id": int(row["transaction_id"]),
        "customer_id": int(row["customer_id"]),
        "terminal_id": int(row["terminal_id"]),
        "amount": float(row["amount"]),
        **override,
    }
    return orjson.dumps(rec)


def _ms(ts: pd.Timestamp) -> int:
    return int(ts.value // 1_000_000)


@pytest.fixture(scope="module")
def many_customers() -> pd.DataFrame:
    """Enough customers with a single transaction on the replayed day."""
    return simulate(
        SimulatorConfig(n_customers=500, n_terminals=1000, nb_days=36, seed=11), progress=False
    )


def test_one_window_update_and_one_outcome_per_transaction_id(
    unique_topics: Settings, many_customers: pd.DataFrame, tmp_path: Path
) -> None:
    small_tx = many_customers
    settings = isolated_settings(unique_topics, tmp_path)
    apply_repo(settings)
    register_tiny_model(settings, small_tx)
    ensure_topics(settings.kafka, settings.topics)
    end = START + pd.Timedelta(days=1)
    in_window = (small_tx["tx_datetime"] >= START) & (small_tx["tx_datetime"] < end)
    window = small_tx[in_window]
    # Customers with a single transaction in the window, one case each.
    counts = window["customer_id"].value_counts()
    singles = window[window["customer_id"].isin(counts[counts == 1].index)].sort_values(
        "transaction_id"
    )
    assert len(singles) >= PER_CASE * len(CASES), len(singles)
    rows = {c: singles.iloc[i * PER_CASE : (i + 1) * PER_CASE] for i, c in enumerate(CASES)}
    # Customers with no transaction in the window at all: targets of wrong keys and of the
    # copies that name another customer (their state must stay untouched).
    idle = sorted(set(small_tx["customer_id"]) - set(window["customer_id"]))
    assert len(idle) >= PER_CASE

    # History (warm-up) and labels through the replay; the window's transactions only by
    # the ordinary producers below.
    plan = ReplayPlan(START, end, history_days=30)
    replay(settings, small_tx[~in_window], plan)

    procs = start_stages(settings)
    try:
        wait_until_ready(settings, procs)
        kafka = settings.kafka.client_config()
        topic = settings.topics.name("transactions")
        # What a plain confluent-kafka producer does: no idempotence, CRC32 partitioner.
        plain = Producer({**kafka, "enable.idempotence": False})
        # The Java client's partitioner, so only the key (or the copy) is off.
        java = Producer({**kafka, "enable.idempotence": False, "partitioner": "murmur2_random"})

        def send(p: Producer, row: pd.Series, key: bytes | None, **override: object) -> None:
            p.produce(topic, _value(row, **override), key, timestamp=_ms(row["tx_datetime"]))

        for _, r in rows["twice"].iterrows():
            send(java, r, b"%d" % r["customer_id"])
            send(java, r, b"%d" % r["customer_id"])
        for _, r in rows["no_key"].iterrows():
            send(plain, r, None)
        for (_, r), other in zip(rows["other_key"].iterrows(), idle, strict=False):
            send(java, r, b"%d" % other)
        for _, r in rows["string_key"].iterrows():
            send(java, r, b'"%d"' % r["customer_id"])
        for _, r in rows["crc32"].iterrows():
            send(plain, r, b"%d" % r["customer_id"])
        for _, r in rows["conflict"].iterrows():
            send(java, r, b"%d" % r["customer_id"])
            send(java, r, b"%d" % r["customer_id"], amount=float(r["amount"]) + 1.0)
        for _, r in rows["moved"].iterrows():
            send(java, r, b"%d" % r["customer_id"])
        for _, r in rows["restart"].iterrows():
            send(java, r, b"%d" % r["customer_id"])
        assert plain.flush(30) == 0 and java.flush(30) == 0

        expected = singles["transaction_id"].iloc[: PER_CASE * len(CASES)].tolist()

        def settled(timeout_s: float) -> object:
            deadline = time.monotonic() + timeout_s
            while True:
                report = audit(settings, expected)
                if not report.lost or time.monotonic() > deadline:
                    return report
                assert all(sp.proc.poll() is None for sp in procs), "a stage died"
                time.sleep(2)

        settled(120)
        # The duplicates of "restart" after the enrichment stage restarted (its dedup state
        # comes back from the changelog).
        enrichment = next(sp for sp in procs if sp.name == "enrichment")
        assert stop_stages([enrichment]) == {"enrichment": 0}
        procs.remove(enrichment)
        procs.append(start_stage(settings, "enrichment"))
        for _, r in rows["restart"].iterrows():
            send(java, r, b"%d" % r["customer_id"])
        # Copies of decided transactions that name another customer: windowed under that
        # customer (its state cannot know the id), but no second outcome.
        for (_, r), other in zip(rows["moved"].iterrows(), idle, strict=False):
            send(java, r, b"%d" % other, customer_id=other)
        assert java.flush(30) == 0
        wait_until_ready(settings, procs)
        time.sleep(5)  # room for a second outcome, if there were one
        report = settled(60)
    finally:
        codes = stop_stages(procs)

    assert set(codes.values()) == {0}
    assert report.lost == []
    assert report.duplicated == []
    assert report.unexpected == []
    t = settings.topics
    decided = Counter(i for topic in t.decision_topics() for i in report.per_topic[topic].ids)
    assert set(decided) == set(expected) and set(decided.values()) == {1}

    # Conflicting copies: dead-lettered with their reason, the first copy decided.
    conflicts = sorted(rows["conflict"]["transaction_id"]) + sorted(rows["moved"]["transaction_id"])
    assert report.conflicts == sorted(conflicts)
    dlq = [
        (orjson.loads(v)["transaction_id"], h[DLQ_REASON].decode())
        for topic in (t.dlq(t.name("transactions")), t.dlq(t.name("enriched")))
        for _, v, h in read_topic(settings, topic)
    ]
    assert sorted(dlq) == sorted((i, "conflicting_duplicate") for i in conflicts)

    # Misplaced records were re-produced under the canonical key, with their reason.
    reasons = Counter(
        h[REKEYED_HEADER].decode()
        for _, _, h in read_topic(settings, t.name("transactions"))
        if REKEYED_HEADER in h
    )
    assert reasons["no_key"] == PER_CASE
    assert reasons["key_mismatch"] == PER_CASE
    assert reasons["key_format"] == PER_CASE
    assert 0 < reasons["wrong_partition"] <= PER_CASE  # CRC32 agrees with murmur2 for some

    # Served features: the batch definitions on the de-duplicated, correctly keyed data.
    preds = {
        p["transaction_id"]: p
        for p in (orjson.loads(v) for _, v, _ in read_topic(settings, t.name("predictions")))
    }
    assert sorted(preds) == sorted(expected)
    truth = compute_features(small_tx).set_index("transaction_id")
    served = pd.DataFrame([preds[i]["features"] for i in expected], index=expected)
    features = [f for f in MODEL_FEATURES if f in served.columns]
    assert len(features) == len(MODEL_FEATURES)
    pd.testing.assert_frame_equal(
        served[features],
        truth.loc[expected, features],
        check_dtype=False,
        check_names=False,
        atol=1e-9,
        rtol=0,
    )

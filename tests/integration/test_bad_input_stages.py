"""Malformed input through every stage, against the real broker and Redis.

A seeded generator (the same kinds of defect as tests/unit/test_bad_input.py: not JSON, wrong
types, missing fields, NaN/infinity literals, negative or absurd amounts, ids beyond int64,
oversized values, empty values, events far in the past)
produces a few thousand bad payloads straight to each stage's input topic (transactions,
labels, transactions.enriched, predictions) while a replay of valid events runs. Then:

* every malformed payload is in its topic's DLQ, once, with the original bytes and the
  reason the stage's own parser gives (the pure parsers are the oracle);
* every valid transaction, including ones by never-seen customers and terminals, has exactly
  one decision;
* no stage died, and all stop cleanly on SIGTERM.

Events far in the *future* cannot be tested here: the broker itself rejects timestamps more
than ``log.message.timestamp.after.max.ms`` ahead (INVALID_TIMESTAMP), so the stage's own
``future_event`` check (for brokers configured otherwise) is covered by the unit tests.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from typing import Any

import orjson
import pandas as pd
import pytest
from confluent_kafka import Producer

from stages.ops.audit import audit, read_topic
from stages.ops.harness.processes import start_stages, stop_stages
from stages.ops.replay import ReplayPlan, replay
from stages.prediction.logic import decode_enriched
from stages.shared.kafka import DLQ_REASON, DLQ_SOURCE, producer_config
from stages.shared.records import parse_label, parse_prediction
from stages.shared.schemas import DAY_MS, MAX_ID, InvalidMessage, parse_transaction
from stages.shared.settings import Settings

pytestmark = pytest.mark.integration

PER_TOPIC = 750
SEED = 20_180_505
START = pd.Timestamp("2018-05-05", tz="UTC")
START_MS = int(START.value // 1_000_000)
# Ids of the injected records: disjoint from the simulated data set's.
BASE_ID = 5 * 10**12

Record = tuple[bytes | None, bytes | None, int]  # key, value, timestamp


def _dumps(obj: Any) -> bytes:
    import json

    return json.dumps(obj, allow_nan=False).encode()


class Malformer:
    """Seeded generator of malformed versions of a valid record."""

    WRONG: tuple[Any, ...] = ("12", "abc", True, False, None, 1.5, [1], {"a": 1}, "")
    OUT_OF_RANGE: tuple[Any, ...] = (-1, -(2**63), MAX_ID, 2**63, 2**64 - 1)

    def __init__(self, rng: random.Random, max_bytes: int) -> None:
        self.rng = rng
        self.max_bytes = max_bytes

    def value(self, base: dict[str, Any], fields: list[str]) -> bytes | None:
        rng = self.rng
        kind = rng.randrange(11)
        rec = dict(base)
        if kind == 0:
            return bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 64)))
        if kind == 1:
            return _dumps(base)[: rng.randrange(1, len(_dumps(base)))]  # truncated
        if kind == 2:
            return _dumps(rng.choice([[1, 2], "text", 3, None, True, [base]]))
        if kind == 3:
            del rec[rng.choice(fields)]
            return _dumps(rec)
        if kind == 4:
            rec[rng.choice(fields)] = rng.choice(self.WRONG)
            return _dumps(rec)
        if kind == 5:
            rec[rng.choice(fields)] = rng.choice(self.OUT_OF_RANGE)
            return _dumps(rec)
        if kind == 6:
            field = rng.choice(fields)
            literal = rng.choice([b"NaN", b"Infinity", b"-Infinity", b"1e400"])
            return _dumps({**rec, field: 0}).replace(
                b'"' + field.encode() + b'": 0', b'"' + field.encode() + b'": ' + literal
            )
        if kind == 7:
            rec["pad"] = "x" * (self.max_bytes + rng.randrange(1, 1000))
            return _dumps(rec)
        if kind == 8:
            return rng.choice([None, b"", b" ", b"\x00"])
        if kind == 9:
            return ("\u2603" * rng.randrange(1, 20)).encode("utf-16")  # not UTF-8
        if "amount" in rec:
            rec["amount"] = rng.choice([-0.01, -1e9, 1e7, 1e300, "12.5"])
        else:
            rec[rng.choice(fields)] = rng.choice(self.OUT_OF_RANGE)
        return _dumps(rec)


def _reason(fn: Any, *args: Any) -> str | None:
    try:
        fn(*args)
    except InvalidMessage as err:
        return err.reason
    return None


def malformed_inputs(settings: Settings, rng: random.Random) -> dict[str, list[tuple[Record, str]]]:
    """Per input topic, (record, expected DLQ reason) for PER_TOPIC malformed records."""
    mb = settings.max_message_bytes
    gen = Malformer(rng, mb)
    t = settings.topics
    out: dict[str, list[tuple[Record, str]]] = {}

    def fill(topic: str, make: Any) -> None:
        rows: list[tuple[Record, str]] = []
        while len(rows) < PER_TOPIC:
            made = make(len(rows))
            if made is not None and made[1] is not None:
                rows.append((made[0], made[1]))
        out[topic] = rows

    def tx(i: int) -> tuple[Record, str | None]:
        base = {
            "transaction_id": BASE_ID + i,
            "customer_id": rng.randrange(150),
            "terminal_id": rng.randrange(300),
            "amount": round(rng.uniform(1, 200), 2),
        }
        value = gen.value(base, list(base))
        ts = START_MS + rng.randrange(DAY_MS)
        reason = _reason(parse_transaction, value, ts, mb)
        return (b"%d" % base["customer_id"], value, ts), reason

    def label(i: int) -> tuple[Record, str | None]:
        base = {
            "transaction_id": BASE_ID + i,
            "customer_id": 1,
            "terminal_id": rng.randrange(300),
            "tx_ms": START_MS - 7 * DAY_MS + rng.randrange(DAY_MS),
            "is_fraud": rng.randrange(2),
        }
        fields = ["transaction_id", "terminal_id", "tx_ms", "is_fraud"]
        key: bytes = b"%d" % base["terminal_id"]
        if rng.random() < 0.1:
            value: bytes | None = _dumps(base)
            key = rng.choice([b"%d" % (base["terminal_id"] + 1), b"not-json", b'"7"'])
        elif rng.random() < 0.1:
            value = _dumps({**base, "is_fraud": rng.choice([2, -1, 10])})
        else:
            value = gen.value(base, fields)
        # A label's terminal is its payload's: another key is no defect (it is indexed
        # under the payload's terminal), so only the value decides.
        reason = _reason(parse_label, value, mb)
        return (key, value, base["tx_ms"] + 7 * DAY_MS), reason

    def enriched(i: int) -> tuple[Record, str | None]:
        ts = START_MS + rng.randrange(DAY_MS)
        base = {
            "transaction_id": BASE_ID + i,
            "customer_id": rng.randrange(150),
            "terminal_id": rng.randrange(300),
            "amount": 10.0,
            "event_ms": ts,
            "ts": {"ingest_ms": 1, "enriched_ms": 2},
            "features": {"customer_spending": {"customer_nb_tx_1d": 1.0}},
        }
        if rng.random() < 0.1:
            base["features"] = {"customer_spending": {"customer_nb_tx_1d": rng.choice(["x", True])}}
            value: bytes | None = _dumps(base)
        else:
            fields = ["transaction_id", "customer_id", "terminal_id", "amount", "event_ms"]
            value = gen.value(base, fields)
        _, bad = decode_enriched([value])
        return (b"%d" % (BASE_ID + i), value, ts), bad[0][1].reason if bad else None

    def prediction(i: int) -> tuple[Record, str | None]:
        ts = START_MS + rng.randrange(DAY_MS)
        base = {"transaction_id": BASE_ID + i, "score": 0.1, "event_ms": ts, "features": {}}
        value = gen.value(base, ["transaction_id", "score", "event_ms"])
        return (b"%d" % (BASE_ID + i), value, ts), _reason(parse_prediction, value)

    fill(t.name("transactions"), tx)
    fill(t.name("labels"), label)
    fill(t.name("enriched"), enriched)
    fill(t.name("predictions"), prediction)
    return out


def test_malformed_input_lands_in_dlqs_and_valid_events_are_unaffected(
    pipeline_settings: Settings, small_tx: pd.DataFrame
) -> None:
    settings = pipeline_settings
    t = settings.topics
    rng = random.Random(SEED)
    bad = malformed_inputs(settings, rng)
    assert sum(len(v) for v in bad.values()) == 4 * PER_TOPIC
    # Many kinds of defect (a label keyed by another terminal is none now: indexed by payload).
    assert len({r for rows in bad.values() for _, r in rows}) >= 7

    plan = ReplayPlan(START, START + pd.Timedelta(days=1))
    expected = plan.transaction_ids(small_tx)
    # Never-seen customers and terminals are valid: each is anchored at one event; a second
    # event of that customer a year (or ten minutes) older is late.
    grace = settings.enrichment.grace_ms
    anchors: list[Record] = []
    late: list[tuple[Record, str]] = []
    for i in range(20):
        cid, tid = 10**9 + i, BASE_ID + 10_000 + i
        ts = START_MS + DAY_MS // 2 + i
        rec = {"transaction_id": tid, "customer_id": cid, "terminal_id": 10**9 + i, "amount": 5}
        anchors.append((b"%d" % cid, _dumps(rec), ts))
        older = ts - rng.choice([365 * DAY_MS, 10 * grace])
        late_rec = {**rec, "transaction_id": tid + 5_000}
        late.append(((b"%d" % cid, _dumps(late_rec), older), "late_event"))
    valid_ids = [*expected, *(orjson.loads(v)["transaction_id"] for _, v, _ in anchors)]
    procs = start_stages(settings)
    try:
        replay_thread = threading.Thread(
            target=replay, args=(settings, small_tx, plan), kwargs={"rate": 150.0}
        )
        replay_thread.start()
        producer = Producer(producer_config(settings.kafka))

        def send(topic: str, rec: Record) -> None:
            key, value, ts = rec
            producer.produce(topic, key=key, value=value, timestamp=ts)
            producer.poll(0)

        # Interleave: a slice of every topic's bad records, then a breath of the replay.
        chunks = 10
        for c in range(chunks):
            for topic, rows in bad.items():
                step = len(rows) // chunks
                for rec, _ in rows[c * step : (c + 1) * step]:
                    send(topic, rec)
            if c == chunks // 2:
                for a in anchors:
                    send(t.name("transactions"), a)
                assert producer.flush(30) == 0
                for rec, _ in late:
                    send(t.name("transactions"), rec)
            time.sleep(0.2)
        assert producer.flush(30) == 0
        replay_thread.join(120)
        assert not replay_thread.is_alive()

        wants = {
            t.dlq(t.name("transactions")): [*bad[t.name("transactions")], *late],
            t.dlq(t.name("labels")): bad[t.name("labels")],
            t.dlq(t.name("enriched")): bad[t.name("enriched")],
            t.dlq(t.name("predictions")): bad[t.name("predictions")],
        }
        deadline = time.monotonic() + 240
        while True:
            report = audit(settings, valid_ids)
            got = {dlq: read_topic(settings, dlq) for dlq in wants}
            complete = all(len(got[d]) >= len(w) for d, w in wants.items())
            if (not report.lost and complete) or time.monotonic() > deadline:
                break
            assert all(sp.proc.poll() is None for sp in procs), "a stage died"
            time.sleep(3)
        alive = all(sp.proc.poll() is None for sp in procs)
    finally:
        codes = stop_stages(procs)

    assert alive
    assert codes == {"enrichment": 0, "prediction": 0, "routing": 0}
    # Every valid event: exactly one decision.
    assert report.lost == []
    assert report.duplicated == []
    decided = Counter(
        i
        for topic in t.decision_topics()
        for i in report.per_topic[topic].ids
        if i in set(valid_ids)
    )
    assert set(decided) == set(valid_ids) and set(decided.values()) == {1}
    # Every malformed record: in its DLQ, once, with its bytes, reason and source.
    for dlq, want in wants.items():
        want_counter = Counter((rec[1] or b"", reason) for rec, reason in want)
        got_counter = Counter((v or b"", h[DLQ_REASON].decode()) for _, v, h in got[dlq])
        assert got_counter == want_counter, (
            dlq,
            list((want_counter - got_counter).items())[:3],
            list((got_counter - want_counter).items())[:3],
        )
        assert all(h[DLQ_SOURCE].decode().startswith(t.prefix) for _, _, h in got[dlq])

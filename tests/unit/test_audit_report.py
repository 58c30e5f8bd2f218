"""AuditReport's queries over the records it read (pure logic: no broker)."""

from __future__ import annotations

import pandas as pd

from stages.ops.audit import AuditReport, TopicRecords, pipeline_input


def test_ids_on_gives_the_ids_of_the_named_topics_only() -> None:
    per_topic = {
        "decisions.action": TopicRecords("decisions.action", 2, ids=[1, 4]),
        "decisions.approved": TopicRecords("decisions.approved", 1, ids=[2]),
        "transactions.dlq": TopicRecords("transactions.dlq", 1, ids=[3]),
    }
    report = AuditReport(4, per_topic, lost=[], duplicated=[], unexpected=[])
    decisions = ("decisions.action", "decisions.review", "decisions.approved")
    # A topic the report holds no records of (decisions.review) adds nothing.
    assert report.ids_on(decisions) == {1, 2, 4}
    assert report.ids_on(["transactions.dlq"]) == {3}
    assert report.ids_on([]) == set()


def test_longest_gap_counts_the_tail_of_a_run_that_did_not_drain() -> None:
    decided = TopicRecords("decisions.approved", 4, ids=[1, 2, 3, 4])
    decided.routed_ms = [1_000, 2_000, 9_000, 10_000]
    report = AuditReport(
        6, {"decisions.approved": decided}, lost=[5, 6], duplicated=[], unexpected=[]
    )
    assert report.longest_gap_s() == 7.0
    # The drain gave up 40 s after the last decision: that is the longest stretch.
    assert report.longest_gap_s(until_ms=50_000) == 40.0
    # A shorter tail leaves the gaps between decisions as they were.
    assert report.longest_gap_s(until_ms=12_000) == 7.0
    assert report.longest_gap_s(until_ms=5_000) == 7.0
    empty = AuditReport(0, {}, lost=[], duplicated=[], unexpected=[])
    assert empty.longest_gap_s(until_ms=5_000) == 0.0


def test_pipeline_input_leaves_out_lost_transactions_and_lost_history_labels() -> None:
    start = pd.Timestamp("2018-05-05", tz="UTC")
    tx = pd.DataFrame(
        {
            "transaction_id": [1, 2, 3, 4, 5],
            "tx_datetime": pd.to_datetime(
                ["2018-04-20", "2018-04-28", "2018-05-05", "2018-05-05T10:00", "2018-05-06"],
                format="ISO8601",
                utc=True,
            ),
        }
    )
    # Transaction 4 never reached the input topic; the labels of 2 (history) and 5
    # (replayed) never reached the labels topic.
    given, inexpressible = pipeline_input(tx, start, lost_ids=[4], lost_label_ids=[2, 5])
    assert given["transaction_id"].tolist() == [1, 3, 5]
    assert inexpressible == [5]
    # Nothing lost: every transaction counts.
    given, inexpressible = pipeline_input(tx, start, lost_ids=[], lost_label_ids=[])
    assert given["transaction_id"].tolist() == [1, 2, 3, 4, 5]
    assert inexpressible == []

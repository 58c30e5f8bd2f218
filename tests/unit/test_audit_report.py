"""AuditReport's queries over the records it read (pure logic: no broker)."""

from __future__ import annotations

from stages.ops.audit import AuditReport, TopicRecords


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

"""The digest of a stage log that a failed chaos fault carries in its report: what the stages
and quixstreams warned about, tracebacks and stacks; not librdkafka's connection chatter."""

# ruff: noqa: E501 (log lines as they are)
from __future__ import annotations

from pathlib import Path

from stages.ops.chaos import log_digest

LOG = """\
2026-12-01 15:22:03,048 INFO stages.shared.metrics: metrics on http://127.0.0.1:28001/metrics
2026-12-01 15:22:08,232 WARNING quixstreams.kafka.producer: METADATAUPDATE [rdkafka#producer-16] [thrd:main]: Partition x[1]: new leader-1 not found in cache
2026-12-01 15:22:08,293 WARNING quixstreams.kafka.producer: 1/1 brokers are down
2026-12-01 15:22:08,302 ERROR quixstreams.kafka.producer: Kafka producer error: TxnCoordinator: connection refused code="-195"
2026-12-01 15:22:18,307 WARNING stages.shared.batch_loop: enrichment-labels transaction aborted (timed out); rewinding 4 messages
2026-12-01 15:22:19,001 WARNING quixstreams.state.recovery: Data partition "t[2]" was consumed by the recovery loop; it is now paused and rewound to offset 17
2026-12-01 15:22:37,967 ERROR stages.enrichment.supervise: enrichment customer app failed; restarting in 1s
Traceback (most recent call last):
  File "/x/quixstreams/app.py", line 975, in run
quixstreams.kafka.exceptions.KafkaProducerDeliveryError: <KafkaProducerDeliveryError code="-192">
%3|1796138528.651|FAIL|rdkafka#consumer-60| [thrd:127.0.0.1:28092/1]: Connect failed
"""

# A watchdog's dump of every thread (faulthandler: innermost frame first), then the new
# process that it started.
STUCK = """\
2026-12-01 15:23:40,001 ERROR stages.shared.watchdog: enrichment customer app has not turned its loop for 40s (stacks follow); the stage starts again as a new process
Thread 0x00007f7b36c29640 (most recent call first):
  File "/x/confluent_kafka/x.py", line 10 in send_offsets
  File "/x/concurrent/futures/thread.py", line 58 in run
  File "/x/concurrent/futures/thread.py", line 83 in _worker
  File "/x/threading.py", line 982 in run
  File "/x/threading.py", line 1045 in _bootstrap_inner

Current thread 0x00007f7b34c28b80 (most recent call first):
  File "/x/concurrent/futures/_base.py", line 451 in result
  File "/x/stages/enrichment/app.py", line 251 in settle
  File "/x/stages/enrichment/app.py", line 280 in commit_transaction
  File "/x/quixstreams/checkpointing/checkpoint.py", line 396 in commit
2026-12-01 15:23:42,120 INFO stages.enrichment.supervise: enrichment labels process stopped (exit code 0)
2026-12-01 15:23:44,500 INFO stages.shared.metrics: metrics on http://127.0.0.1:28001/metrics
2026-12-01 15:23:44,800 INFO stages.enrichment.supervise: enrichment labels process 4242 started
2026-12-01 15:23:45,000 INFO stages.enrichment.app: something routine
"""


def test_digest_keeps_what_went_wrong_and_drops_librdkafka_chatter(tmp_path: Path) -> None:
    log = tmp_path / "stage.log"
    log.write_text(LOG)
    digest = log_digest(log)
    assert [
        line.split(" ")[3] if line[:4] == "2026" else line.split(" ")[0] for line in digest
    ] == [
        "stages.shared.metrics:",  # the process started
        "stages.shared.batch_loop:",
        "quixstreams.state.recovery:",
        "stages.enrichment.supervise:",
        "Traceback",
        "",
        "quixstreams.kafka.exceptions.KafkaProducerDeliveryError:",
    ]
    assert log_digest(log, max_lines=2) == digest[-2:]
    assert log_digest(tmp_path / "missing.log")[0].startswith("unreadable: ")


def test_digest_keeps_the_innermost_frames_of_each_thread_and_the_restart(tmp_path: Path) -> None:
    log = tmp_path / "stage.log"
    log.write_text(STUCK)
    digest = log_digest(log)
    assert digest[0].endswith("the stage starts again as a new process")
    # A line per thread, its innermost frames first.
    assert digest[1:3] == [
        "Thread 0x00007f7b36c29640: send_offsets (x.py:10) < run (thread.py:58)"
        " < _worker (thread.py:83)",
        "Current thread 0x00007f7b34c28b80: result (_base.py:451) < settle (app.py:251)"
        " < commit_transaction (app.py:280)",
    ]
    assert [line.split(": ", 1)[1] for line in digest[-3:]] == [
        "enrichment labels process stopped (exit code 0)",
        "metrics on http://127.0.0.1:28001/metrics",
        "enrichment labels process 4242 started",
    ]
    assert len(digest) == 1 + 2 + 3

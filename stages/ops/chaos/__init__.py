"""``rtpipe chaos``: fault injection against the real local stack, each fault followed by an
audit (lost = 0, duplicated = 0 over every transaction id, read_committed) and a check that
the online features equal the batch recomputation.

Each fault runs on its own topics (a prefix), consumer groups, Feast project, registry and
state, with the three stages as separate ``rtpipe run`` processes and a rate-limited replay of
a few thousand simulated transactions, so that the fault lands mid-stream:

=================  =============================================================================
kill-enrichment    ``kill -9`` of the stage at random moments (3 times), restarted each time
kill-prediction    the same for the prediction stage
kill-routing       the same for the routing stage
rebalance          two prediction replicas in one group; one is killed mid-stream
redis-pause        Redis stopped for 30 s, ``on_features_unavailable=pause`` (backpressure)
redis-review       the same with ``on_features_unavailable=review`` (decisions.review,
                   reason features_unavailable)
redis-pause-short  Redis stopped for 3 s (pause): a blip inside one checkpoint's retries
redis-review-short the same in review mode
kafka-restart      the Kafka broker stopped and started again mid-stream
bad-model          a version failing its sha256, then one that does not load, promoted in turn
=================  =============================================================================

The outages start at a random point of the stream, so they land at a checkpoint or between
two. The full set (``rtpipe chaos``) runs each Redis and broker fault ``repeats`` times in a
row (3), the last time while another process keeps a core busy (``cpu_load_last``).
"""

from stages.ops.chaos.report import ChaosConfig, ChaosReport, FaultResult
from stages.ops.chaos.run import log_digest
from stages.ops.chaos.suite import FAULTS, REPEATED, run_chaos

__all__ = [
    "FAULTS",
    "REPEATED",
    "ChaosConfig",
    "ChaosReport",
    "FaultResult",
    "log_digest",
    "run_chaos",
]

"""A Redis Cluster failing over (a master lost, its replica not promoted yet) answers
CLUSTERDOWN, TRYAGAIN or MASTERDOWN; the cluster transport, the label index and the
evaluation join store turn those into a ``redis.ConnectionError``, which the stages retry
(backpressure) instead of crashing on. Other error replies stay errors."""

from __future__ import annotations

import hiredis
import pytest
import redis
from redis.exceptions import ClusterDownError, MasterDownError, ResponseError, TryAgainError

from stages.shared.online.cluster import cluster_unavailable, is_cluster_unavailable


@pytest.mark.parametrize(
    "error",
    [
        ClusterDownError("The cluster is down"),
        MasterDownError("Link with MASTER is down"),
        TryAgainError("Multiple keys request during rehashing of slot"),
        hiredis.ReplyError("CLUSTERDOWN The cluster is down"),
        hiredis.ReplyError("TRYAGAIN Multiple keys request during rehashing of slot"),
        hiredis.ReplyError("MASTERDOWN Link with MASTER is down"),
        ResponseError(
            "ERR Script attempted to execute a command while the cluster is down script: "
            "217c5c69a6f83b808b042b8e3067b7e35314a5fe, on @user_script:16."
        ),
    ],
)
def test_failover_replies_are_transient(error: Exception) -> None:
    assert is_cluster_unavailable(error)
    converted = cluster_unavailable(error)
    assert isinstance(converted, redis.ConnectionError)
    assert str(error) in str(converted)


@pytest.mark.parametrize(
    "error",
    [
        hiredis.ReplyError("NOSCRIPT No matching script. Please use EVAL."),
        hiredis.ReplyError("WRONGTYPE Operation against a key holding the wrong kind of value"),
        hiredis.ReplyError("MOVED 3999 127.0.0.1:6381"),
        ResponseError("ERR unknown command"),
    ],
)
def test_other_errors_are_not(error: Exception) -> None:
    assert not is_cluster_unavailable(error)

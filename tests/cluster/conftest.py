"""Session fixtures of the cluster tier: a three-node KRaft quorum and a Redis Cluster (three
masters, one replica each), started once per session by ``infra/stack/`` on ports of their
own (Kafka 30192/30193, 30292/30293, 30392/30393; Redis 30701-30706; stage metrics
30101-30105, +100 per replica) under ``.rtpipe/cluster-30100``, and stopped at the end if
this session started them. The settings and ports are in ``tests.support``.

Every port is below Linux's ephemeral range (``net.ipv4.ip_local_port_range``, 32768-60999
by default): in it, a client's outgoing connection can take a port a broker is about to bind
(it happened: a connection held 33192 and the first broker failed to start).

Kafka and Redis have separate fixtures, so a run of only the Redis tests starts no JVM.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from stages.shared.settings import Settings
from tests.support import make_cluster_settings


def _session_stack(component: str) -> Iterator[Settings]:
    from infra import stack

    settings = make_cluster_settings()
    started = stack.up(settings, components=(component,))
    try:
        yield settings
    finally:
        if os.environ.get("RTPIPE_KEEP_TEST_STACK") != "1":
            stack.down(settings, only=started)


@pytest.fixture(scope="session")
def kafka_cluster() -> Iterator[Settings]:
    """The three-node Kafka cluster for the session (idempotent)."""
    yield from _session_stack("kafka")


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[Settings]:
    """The Redis Cluster for the session (idempotent)."""
    yield from _session_stack("redis")

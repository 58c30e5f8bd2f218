"""Session fixture of the secure tier: a secure single-node stack (Kafka on SASL_SSL with
SCRAM-SHA-512, controllers on mutual TLS; Redis on TLS only with ACL users), certificates and
passwords made by the stack itself under ``.rtpipe/secure-30100/run/secure``, started once per
session on ports of its own (``tests.support.SECURE_BASE``) and stopped at the end if this
session started it. With ``RTPIPE_CLUSTER_FULL=1``, also a secure cluster stack (three
brokers, a Redis Cluster of three masters and three replicas)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from stages.shared.settings import Settings
from tests.support import CLUSTER_FULL, make_secure_cluster_settings, make_secure_settings


def _secure_stack(settings: Settings) -> Iterator[Settings]:
    from infra import stack

    started = stack.up(settings, components=("kafka", "redis"))
    try:
        # The pipeline's users, as client.env gives them to a stage.
        yield stack.secure_client_settings(settings)
    finally:
        if os.environ.get("RTPIPE_KEEP_TEST_STACK") != "1":
            stack.down(settings, only=started)


@pytest.fixture(scope="session")
def secure_stack() -> Iterator[Settings]:
    """The secure single-node stack, and settings whose clients use it."""
    yield from _secure_stack(make_secure_settings())


@pytest.fixture(scope="session")
def secure_cluster() -> Iterator[Settings]:
    """The secure cluster stack (RTPIPE_CLUSTER_FULL=1 only: four more JVM and six Redis
    starts, TLS between every node)."""
    if not CLUSTER_FULL:
        pytest.skip("the secure cluster stack runs with RTPIPE_CLUSTER_FULL=1")
    yield from _secure_stack(make_secure_cluster_settings())

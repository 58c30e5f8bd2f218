"""Plain helpers of the tests (fixtures are in the ``conftest.py`` files): the settings of
the test and cluster stacks, and waiting for a condition. Isolated settings and a tiny model
come from the ops harness (``stages.ops.harness.sandbox``)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from stages.shared.settings import Settings, on_cluster, on_port_base

T = TypeVar("T")

REPO = Path(__file__).resolve().parent.parent

# Test stack ports are BASE+92 (Kafka), +93 (controller), +379 (Redis), +90 (Prometheus),
# stage metrics +1..+5; override to run two suites side by side.
BASE = int(os.environ.get("RTPIPE_TEST_PORT_BASE", "29000"))
TEST_HOME = REPO / ".rtpipe" / f"test-{BASE}"

# The cluster tier (tests/cluster/conftest.py): ports of its own under this base.
CLUSTER_BASE = int(os.environ.get("RTPIPE_CLUSTER_PORT_BASE", "30100"))
CLUSTER_HOME = REPO / ".rtpipe" / f"cluster-{CLUSTER_BASE}"
# The long variants (a broker stopped under load, a Redis failover) run only when asked.
CLUSTER_FULL = os.environ.get("RTPIPE_CLUSTER_FULL") == "1"

# The secure tier (tests/secure/): a secure single-node stack on ports of the cluster base's
# +400 block (Kafka +492/+493, Redis +779, stage metrics +401..+405), and with
# RTPIPE_CLUSTER_FULL=1 a secure cluster stack (Kafka +842/+942/+1042 and their controllers
# +1, Redis Cluster +1001..+1006 with buses +1101..+1106): none of the cluster stack's ports.
SECURE_BASE = CLUSTER_BASE + 400


def make_test_settings(**overrides: object) -> Settings:
    """Settings pointing at the test stack; ``overrides`` replace top-level fields."""
    base = Settings(home=TEST_HOME, feature_repo=REPO / "feature_repo")
    return on_port_base(base, BASE).model_copy(update=overrides)


def make_cluster_settings() -> Settings:
    """Settings for the cluster stack: brokers on BASE+92 (+100, +200), Redis on BASE+601.."""
    base = Settings(home=CLUSTER_HOME, feature_repo=REPO / "feature_repo")
    settings = on_cluster(
        on_port_base(base, CLUSTER_BASE),
        kafka_port=CLUSTER_BASE + 92,
        redis_port=CLUSTER_BASE + 601,
    )
    # Three JVMs on a small machine: a smaller heap each.
    return settings.model_copy(
        update={"stack": settings.stack.model_copy(update={"kafka_heap": "512m"})}
    )


def make_secure_settings() -> Settings:
    """Settings for the secure single-node stack (``stack.secure``); the clients' credentials
    come from the stack's run dir once it is up (``infra.stack.secure_client_settings``)."""
    base = Settings(
        home=REPO / ".rtpipe" / f"secure-{CLUSTER_BASE}", feature_repo=REPO / "feature_repo"
    )
    settings = on_port_base(base, SECURE_BASE)
    stack = settings.stack.model_copy(update={"secure": True, "kafka_heap": "512m"})
    return settings.model_copy(update={"stack": stack})


def make_secure_cluster_settings() -> Settings:
    """Settings for the secure cluster stack: three brokers, a Redis Cluster, all secure."""
    base = Settings(
        home=REPO / ".rtpipe" / f"secure-cluster-{CLUSTER_BASE}", feature_repo=REPO / "feature_repo"
    )
    settings = on_cluster(
        on_port_base(base, SECURE_BASE),
        kafka_port=CLUSTER_BASE + 842,
        redis_port=CLUSTER_BASE + 1001,
    )
    stack = settings.stack.model_copy(update={"secure": True, "kafka_heap": "512m"})
    return settings.model_copy(update={"stack": stack})


def wait_until(
    what: str, cond: Callable[[], T], timeout_s: float = 120.0, every_s: float = 0.2
) -> T:
    """``cond()`` once it is truthy, polled every ``every_s``; fails the test after
    ``timeout_s`` naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")

"""Session fixtures: a real local stack (Kafka in KRaft mode, Redis) on test-only ports.

The stack is started by the test command itself (``make test``) through this fixture, in its
own home folder and on ports that do not clash with a demo stack; it is stopped at the end
only if this session started it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings as hypothesis_settings

from stages.shared.settings import Settings, TopicSettings, on_port_base

# In CI the property tests replay a fixed sequence of examples (derandomized), so a run is
# reproducible; locally each run explores new inputs (and saves failures to .hypothesis/).
hypothesis_settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    hypothesis_settings.load_profile("ci")

REPO = Path(__file__).resolve().parent.parent
# Test stack ports are BASE+92 (Kafka), +93 (controller), +379 (Redis), +90 (Prometheus),
# stage metrics +1..+5; override to run two suites side by side.
BASE = int(os.environ.get("RTPIPE_TEST_PORT_BASE", "29000"))
TEST_HOME = REPO / ".rtpipe" / f"test-{BASE}"


def make_test_settings(**overrides: object) -> Settings:
    """Settings pointing at the test stack; ``overrides`` replace top-level fields."""
    base = Settings(home=TEST_HOME, feature_repo=REPO / "feature_repo")
    return on_port_base(base, BASE).model_copy(update=overrides)


@pytest.fixture(scope="session")
def stack_settings() -> Iterator[Settings]:
    """Start Kafka and Redis for the session (idempotent); stop what this session started."""
    from infra import stack

    settings = make_test_settings()
    started = stack.up(settings, components=("kafka", "redis"))
    try:
        yield settings
    finally:
        if os.environ.get("RTPIPE_KEEP_TEST_STACK") != "1":
            stack.down(settings, only=started)


@pytest.fixture
def unique_topics(stack_settings: Settings) -> Settings:
    """Settings whose topics (prefix) and consumer groups are unique to one test."""
    prefix = f"t{uuid.uuid4().hex[:10]}."
    return stack_settings.model_copy(update={"topics": TopicSettings(prefix=prefix)})

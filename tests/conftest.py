"""Session fixtures: a real local stack (Kafka in KRaft mode, Redis) on test-only ports.

The stack is started by the test command itself (``make test``) through this fixture, in its
own home folder and on ports that do not clash with a demo stack (``tests.support``); it is
stopped at the end only if this session started it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pandas as pd
import pytest
from hypothesis import settings as hypothesis_settings

from stages.shared.settings import Settings, TopicSettings
from tests.support import make_test_settings

# In CI the property tests replay a fixed sequence of examples (derandomized), so a run is
# reproducible; locally each run explores new inputs (and saves failures to .hypothesis/).
hypothesis_settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    hypothesis_settings.load_profile("ci")


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


@pytest.fixture(scope="module")
def small_tx() -> pd.DataFrame:
    """A small simulated data set: 150 customers, 300 terminals, 50 days (seed 7)."""
    from training.simulate import SimulatorConfig, simulate

    return simulate(
        SimulatorConfig(n_customers=150, n_terminals=300, nb_days=50, seed=7), progress=False
    )

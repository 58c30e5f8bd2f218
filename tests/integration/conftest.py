"""Fixtures shared by the integration tests (the stack and ``small_tx`` come from
tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from stages.ops.harness.sandbox import isolated_settings, provision
from stages.shared.settings import Settings


@pytest.fixture
def pipeline_settings(unique_topics: Settings, small_tx: pd.DataFrame, tmp_path: Path) -> Settings:
    """Isolated settings on the test's own topics, ready for the stages: the feature repo
    applied, a tiny model trained on ``small_tx`` promoted, the topics created."""
    settings = isolated_settings(unique_topics, tmp_path)
    provision(settings, small_tx)
    return settings

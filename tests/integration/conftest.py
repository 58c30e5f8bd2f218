"""Fixtures shared by the integration tests (the stack itself comes from tests/conftest.py)."""

from __future__ import annotations

import pandas as pd
import pytest

from training.simulate import SimulatorConfig, simulate


@pytest.fixture(scope="module")
def small_tx() -> pd.DataFrame:
    """A small simulated data set: 150 customers, 300 terminals, 50 days."""
    return simulate(
        SimulatorConfig(n_customers=150, n_terminals=300, nb_days=50, seed=7), progress=False
    )

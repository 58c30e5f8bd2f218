"""Chaos tests: fault scenarios against the real local stack (see stages/ops/chaos/).

By default every fault runs once at a small size (one kill -9 per stage, 15 s Redis outages
in both modes, a broker restart, bad models), in a few minutes. The full set, as ``rtpipe
chaos`` runs it (three kills per stage, a rebalance, 30 s outages), is marked ``slow`` and
runs with ``RTPIPE_CHAOS_FULL=1``.
"""

from __future__ import annotations

import os

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "chaos: fault injection against the local stack")
    config.addinivalue_line("markers", "slow: long; runs with RTPIPE_CHAOS_FULL=1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("RTPIPE_CHAOS_FULL") == "1":
        return
    skip = pytest.mark.skip(reason="slow chaos scenario: set RTPIPE_CHAOS_FULL=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)

"""Every exception class the project defines derives from RtpipeError
(stages/shared/errors.py), so ``except RtpipeError`` catches what rtpipe raises and nothing
a dependency raises."""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from stages.shared.errors import RtpipeError

REPO = Path(__file__).resolve().parents[2]
# Imported for their classes only; nothing runs at import time (STYLE.md).
PACKAGES = ("stages", "training", "infra")


def _modules() -> list[str]:
    names = []
    for package in PACKAGES:
        for info in pkgutil.walk_packages([str(REPO / package)], prefix=f"{package}."):
            names.append(info.name)
    return sorted(names)


def test_the_walk_sees_the_packages() -> None:
    modules = _modules()
    assert "stages.shared.online.errors" in modules and "training.registry" in modules


@pytest.fixture(autouse=True)
def _environ_kept() -> Iterator[None]:
    # Importing Feast sets PROMETHEUS_MULTIPROC_DIR (and LightGBM's OpenMP two KMP_
    # variables) in os.environ; the processes later tests start must not inherit them.
    before = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(before)


@pytest.mark.parametrize("module", _modules())
def test_project_exceptions_derive_from_the_root(module: str) -> None:
    mod = importlib.import_module(module)
    for name, obj in vars(mod).items():
        if (
            inspect.isclass(obj)
            and issubclass(obj, BaseException)
            and obj.__module__ == module
            and obj is not RtpipeError
        ):
            assert issubclass(obj, RtpipeError), f"{module}.{name} does not derive RtpipeError"

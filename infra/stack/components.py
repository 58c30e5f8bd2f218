"""The stack's components (Kafka, Redis, Prometheus): their names in dependency order, how
long each may take to start and to stop, and what ``status`` reports of one."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from infra.stack.errors import StackError

Component = Literal["kafka", "redis", "prometheus"]
COMPONENTS: tuple[Component, ...] = get_args(Component)

START_TIMEOUT_S: dict[Component, float] = {"kafka": 90.0, "redis": 20.0, "prometheus": 30.0}
STOP_TIMEOUT_S: dict[Component, float] = {"kafka": 30.0, "redis": 10.0, "prometheus": 10.0}


@dataclass(frozen=True)
class ComponentStatus:
    """What ``status`` knows about one component.

    Attributes:
        name: Component name (``kafka-2``, ``redis-33701``: one node of a cluster stack).
        running: A process we started (PID file, matching command line) is alive.
        pid: That process id, if running.
        port: The port the component serves on.
        healthy: The health check on ``port`` passes (whoever serves it).
        log: Where the component logs.
    """

    name: str
    running: bool
    pid: int | None
    port: int
    healthy: bool
    log: Path


def validate_components(components: Iterable[str]) -> list[Component]:
    """The names given, each once, in dependency order; StackError for an unknown one."""
    out: list[Component] = []
    for name in components:
        if name not in COMPONENTS:
            raise StackError(f"unknown component {name!r}: expected one of {', '.join(COMPONENTS)}")
        if name not in out:
            out.append(name)
    # Always in dependency order, whatever order the caller gave.
    return [c for c in COMPONENTS if c in out]

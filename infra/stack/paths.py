"""Where the single-node stack keeps each component's files under ``settings.run_dir`` (PID
file, log, config, data) and the port each serves on."""

from __future__ import annotations

from pathlib import Path

from infra.stack.components import Component
from stages.shared.settings import Settings


def run_dir(settings: Settings) -> Path:
    return settings.run_dir.resolve()


def pid_file(settings: Settings, comp: str) -> Path:
    return run_dir(settings) / f"{comp}.pid"


def log_file(settings: Settings, comp: str) -> Path:
    return run_dir(settings) / f"{comp}.log"


def component_port(settings: Settings, comp: Component) -> int:
    return {
        "kafka": settings.stack.kafka_port,
        "redis": settings.stack.redis_port,
        "prometheus": settings.stack.prometheus_port,
    }[comp]


def kafka_properties_file(settings: Settings) -> Path:
    return run_dir(settings) / "kafka" / "server.properties"


def prometheus_config_file(settings: Settings) -> Path:
    return run_dir(settings) / "prometheus" / "prometheus.yml"


def redis_dir(settings: Settings) -> Path:
    return run_dir(settings) / "redis"


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by its owner only (created 0600, never wider, even
    for a moment): configs and files that hold passwords or keys."""
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text(text)

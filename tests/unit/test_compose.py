"""docker-compose.yml is a valid Compose file with the services the design names."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EXPECTED_SERVICES = {
    "kafka",
    "redis",
    "prometheus",
    "grafana",
    "enrichment",
    "prediction",
    "routing",
    "evaluation",
}


def _compose_command() -> list[str] | None:
    """``docker compose`` (v2 plugin) if present, else the standalone ``docker-compose``."""
    docker = shutil.which("docker")
    if docker is not None:
        probe = subprocess.run(
            [docker, "compose", "version"], capture_output=True, text=True, check=False
        )
        if probe.returncode == 0:
            return [docker, "compose"]
    standalone = shutil.which("docker-compose")
    return [standalone] if standalone else None


@pytest.fixture(scope="module")
def compose() -> list[str]:
    cmd = _compose_command()
    if cmd is None:
        pytest.skip("no Compose client (docker compose or docker-compose) installed")
    return cmd


def _run(compose: list[str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*compose, "-f", str(REPO / "docker-compose.yml"), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )


def test_compose_file_is_valid(compose: list[str]) -> None:
    proc = _run(compose, "config", "-q")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_compose_defines_the_stack_and_the_four_stages(compose: list[str]) -> None:
    proc = _run(compose, "config", "--services")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert set(proc.stdout.split()) == EXPECTED_SERVICES


def test_stage_replicas_come_from_the_environment(compose: list[str]) -> None:
    import os

    import yaml

    env = {**os.environ, "RTPIPE_PREDICTION_REPLICAS": "3"}
    proc = subprocess.run(
        [*compose, "-f", str(REPO / "docker-compose.yml"), "config"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    services = yaml.safe_load(proc.stdout)["services"]
    replicas = {
        s: services[s]["deploy"]["replicas"] for s in EXPECTED_SERVICES if "deploy" in services[s]
    }
    assert replicas == {"enrichment": 1, "prediction": 3, "routing": 1, "evaluation": 1}

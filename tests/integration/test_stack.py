"""The local stack manager against real processes: idempotence, health, ownership, cleanup."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic
from pydantic import SecretStr
from redis.backoff import NoBackoff
from redis.retry import Retry
from typer.testing import CliRunner

from infra import stack
from infra.cli import stack_app
from stages.shared.settings import MetricsSettings, RedisSettings, Settings, StackSettings
from tests.support import make_test_settings


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _redis(settings: Settings) -> redis.Redis:
    password = settings.redis.password.get_secret_value() if settings.redis.password else None
    return redis.Redis(host="127.0.0.1", port=settings.stack.redis_port, password=password)


@pytest.fixture
def own_settings(stack_settings: Settings, tmp_path: Path) -> Iterator[Settings]:
    """A second stack home on free ports, whose Kafka port is the session's broker."""
    settings = make_test_settings(
        home=tmp_path / "home",
        stack=StackSettings(
            kafka_port=stack_settings.stack.kafka_port,
            kafka_controller_port=stack_settings.stack.kafka_controller_port,
            redis_port=_free_port(),
            prometheus_port=_free_port(),
            cache_dir=stack_settings.stack.cache_dir,
        ),
    )
    yield settings
    stack.down(settings)


# ----------------------------------------------------------------------- session stack


@pytest.mark.integration
def test_up_again_starts_nothing(stack_settings: Settings) -> None:
    assert stack.up(stack_settings, components=("kafka", "redis")) == []


@pytest.mark.integration
def test_status_reports_kafka_and_redis_healthy(stack_settings: Settings) -> None:
    status = stack.status(stack_settings)

    assert set(status) == {"kafka", "redis", "prometheus"}
    for name, port in (
        ("kafka", stack_settings.stack.kafka_port),
        ("redis", stack_settings.stack.redis_port),
    ):
        assert status[name].healthy, status[name]
        assert status[name].port == port
        # Started by this session or kept from an earlier one (RTPIPE_KEEP_TEST_STACK=1).
        assert status[name].running == (status[name].pid is not None)


@pytest.mark.integration
def test_redis_runs_with_append_only_persistence(stack_settings: Settings) -> None:
    client = _redis(stack_settings)
    try:
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        if stack.status(stack_settings)["redis"].running:
            expected = str((stack_settings.run_dir / "redis").resolve())
            assert client.config_get("dir") == {"dir": expected}
    finally:
        client.close()


@pytest.mark.integration
def test_kafka_topic_is_created_and_a_message_round_trips(stack_settings: Settings) -> None:
    conf = stack_settings.kafka.client_config()
    topic = f"stack-test-{uuid.uuid4().hex[:10]}"
    admin = AdminClient(conf)
    admin.create_topics([NewTopic(topic, num_partitions=2, replication_factor=1)])[topic].result(
        timeout=30
    )
    # Topic metadata reaches the broker's cache shortly after the controller commits it.
    deadline = time.monotonic() + 10
    while topic not in admin.list_topics(timeout=10).topics:
        assert time.monotonic() < deadline, f"{topic} not in metadata after 10 s"
        time.sleep(0.1)

    producer = Producer(conf)
    producer.produce(topic, key=b"c-1", value=json.dumps({"amount": 12.5}).encode())
    assert producer.flush(30) == 0

    consumer = Consumer({**conf, "group.id": f"g-{topic}", "auto.offset.reset": "earliest"})
    consumer.subscribe([topic])
    try:
        deadline = time.monotonic() + 30
        msg = None
        while msg is None and time.monotonic() < deadline:
            polled = consumer.poll(0.5)
            if polled is not None and polled.error() is None:
                msg = polled
    finally:
        consumer.close()
    assert msg is not None, "no message consumed within 30 s"
    assert msg.key() == b"c-1"
    assert json.loads(msg.value() or b"") == {"amount": 12.5}


@pytest.mark.integration
def test_broker_probe_reads_the_session_broker_and_its_jit_threads(
    stack_settings: Settings,
) -> None:
    from infra.stack.broker_cpu import BrokerCpu, broker_probe

    probe = broker_probe(stack_settings)
    assert probe is not None, "the session's broker was not found by its PID file"
    before = probe.sample()
    admin = AdminClient(stack_settings.kafka.client_config())
    for _ in range(50):  # requests the broker has to answer
        admin.list_topics(timeout=10)
    time.sleep(0.1)
    after = probe.sample()
    # A JVM that has started and served requests has compiled code on its C1/C2 threads.
    assert after.jit_s > 0 and after.total_s > after.jit_s
    assert after.total_s >= before.total_s and after.jit_s >= before.jit_s
    cores = BrokerCpu.cores(before, after)
    assert 0 <= cores["broker jit cores"] <= cores["broker cores"] <= 2 * (os.cpu_count() or 1)
    # Not ours (a settings home with no broker): no probe.
    other = make_test_settings(home=stack_settings.home / "no-such-stack")
    assert broker_probe(other) is None


# ----------------------------------------------------------------------- a second stack


@pytest.mark.integration
def test_down_stops_exactly_what_up_started(
    stack_settings: Settings, own_settings: Settings
) -> None:
    started = stack.up(own_settings)

    # Kafka already answers on the shared port, so this stack did not start one.
    assert started == ["redis", "prometheus"]
    assert stack.up(own_settings) == []
    status = stack.status(own_settings)
    assert status["kafka"].healthy and not status["kafka"].running
    assert status["redis"].running and status["prometheus"].running

    assert stack.down(own_settings, only=["prometheus"]) == ["prometheus"]
    status = stack.status(own_settings)
    assert not status["prometheus"].healthy and not status["prometheus"].running
    assert status["redis"].healthy

    assert stack.down(own_settings, only=[]) == []
    assert stack.down(own_settings) == ["redis"]
    assert not stack.status(own_settings)["redis"].healthy
    # The session stack is untouched.
    session = stack.status(stack_settings)
    assert session["kafka"].healthy and session["redis"].healthy
    assert not (own_settings.run_dir / "redis.pid").exists()


@pytest.mark.integration
def test_prometheus_scrapes_the_four_stages_and_loads_the_alert_rules(
    own_settings: Settings,
) -> None:
    assert stack.up(own_settings, components=("prometheus",)) == ["prometheus"]
    base = f"http://127.0.0.1:{own_settings.stack.prometheus_port}/api/v1"

    # Target discovery runs just after readiness: give it a few seconds.
    deadline = time.monotonic() + 15
    targets: list[dict[str, Any]] = []
    while len(targets) < 5 and time.monotonic() < deadline:
        time.sleep(0.2)
        with urllib.request.urlopen(f"{base}/targets", timeout=5) as resp:
            targets = json.load(resp)["data"]["activeTargets"]
    scraped: dict[str, set[str]] = {}
    for t in targets:
        scraped.setdefault(t["labels"]["job"], set()).add(t["scrapeUrl"])
    assert scraped == {
        stage: {f"http://127.0.0.1:{port}/metrics" for port in own_settings.metrics.ports(stage)}
        for stage in ("enrichment", "prediction", "routing", "evaluation")
    }
    # The enrichment stage's two processes: customer windows and terminal windows.
    assert len(scraped["enrichment"]) == 2
    with urllib.request.urlopen(f"{base}/rules", timeout=5) as resp:
        groups = json.load(resp)["data"]["groups"]
    alerts = {rule["name"] for group in groups for rule in group["rules"]}
    assert {"RtpipeConsumerLagHigh", "RtpipeDecisionLatencySLO"} <= alerts


@pytest.mark.integration
def test_redis_password_is_required_and_kept_off_the_command_line(
    own_settings: Settings,
) -> None:
    settings = own_settings.model_copy(
        update={
            "redis": RedisSettings(
                port=own_settings.stack.redis_port, password=SecretStr("s3cret-pw")
            )
        }
    )
    assert stack.up(settings, components=("redis",)) == ["redis"]
    pid = stack.status(settings)["redis"].pid
    assert pid is not None
    assert b"s3cret-pw" not in Path(f"/proc/{pid}/cmdline").read_bytes()

    anonymous = redis.Redis(
        host="127.0.0.1", port=settings.stack.redis_port, retry=Retry(NoBackoff(), 0)
    )
    with pytest.raises(redis.AuthenticationError):
        anonymous.ping()
    anonymous.close()
    assert stack.down(settings) == ["redis"]


@pytest.mark.integration
def test_down_never_signals_a_pid_it_does_not_own(own_settings: Settings) -> None:
    stranger = subprocess.Popen(["sleep", "60"])
    try:
        own_settings.run_dir.mkdir(parents=True)
        pid_file = own_settings.run_dir / "redis.pid"
        pid_file.write_text(f"{stranger.pid}\n")

        assert stack.down(own_settings) == []
        assert stranger.poll() is None, "down() killed a process it did not start"
        assert not pid_file.exists(), "stale PID file left behind"
    finally:
        stranger.kill()
        stranger.wait()


@pytest.mark.integration
def test_failed_up_stops_what_it_started_and_says_where_to_look(own_settings: Settings) -> None:
    # A scrape target Prometheus rejects: it exits at start, after Redis is already up.
    broken = own_settings.model_copy(update={"metrics": MetricsSettings(host="bad/host")})

    with pytest.raises(stack.StackError, match=r"prometheus exited .*prometheus\.log.*bad/host"):
        stack.up(broken, components=("redis", "prometheus"))

    status = stack.status(broken)
    assert not status["redis"].healthy and not status["redis"].running
    assert not (broken.run_dir / "redis.pid").exists()


@pytest.mark.integration
def test_up_refuses_a_port_taken_by_something_else(own_settings: Settings) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", own_settings.stack.redis_port))
        squatter.listen()
        with pytest.raises(stack.StackError, match=r"port \d+ is in use"):
            stack.up(own_settings, components=("redis",))
    assert not (own_settings.run_dir / "redis.pid").exists()


# ----------------------------------------------------------------------- pure


def test_preflight_names_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))

    with pytest.raises(
        stack.StackError, match=r"redis-server not found.*apt-get install redis-server"
    ):
        stack.preflight(["redis"])
    with pytest.raises(stack.StackError, match=r"prometheus not found.*make bootstrap"):
        stack.preflight(["prometheus"])
    with pytest.raises(stack.StackError, match=r"java not found"):
        stack.preflight(["kafka"])
    with pytest.raises(stack.StackError, match="unknown component 'zookeeper'"):
        stack.preflight(["zookeeper"])


def test_preflight_passes_when_binaries_exist(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in ("java", "mvn", "redis-server", "prometheus"):
        exe = tmp_path / name
        exe.write_text("#!/bin/sh\n")
        exe.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))

    stack.preflight(["kafka", "redis", "prometheus"])


def test_cli_exits_1_with_a_one_line_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RTPIPE_HOME", str(tmp_path))

    result = CliRunner().invoke(stack_app, ["up", "--only", "redis,zookeeper"])

    assert result.exit_code == 1
    assert result.output.strip() == (
        "error: unknown component 'zookeeper': expected one of kafka, redis, prometheus"
    )
    assert not (tmp_path / "run").exists()

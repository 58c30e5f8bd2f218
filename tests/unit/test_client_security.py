"""Kafka SASL/SSL and Redis password/TLS come from the settings object and reach every client;
secrets never show in ``repr(settings)`` or in log output; metrics bind to loopback by default.
"""

from __future__ import annotations

import ast
import logging
import socket
from pathlib import Path

import pytest
from confluent_kafka import Producer
from pydantic import SecretStr

from stages.shared.kafka import consumer_config, producer_config
from stages.shared.metrics import build_metrics
from stages.shared.settings import KafkaSettings, RedisSettings, Settings, settings_to_env

REPO = Path(__file__).resolve().parents[2]
KAFKA_SECRET = "kafka-s3cret-do-not-log"
KEY_SECRET = "key-s3cret-do-not-log"
REDIS_SECRET = "redis-s3cret-do-not-log"


@pytest.fixture
def secure() -> Settings:
    return Settings(
        kafka=KafkaSettings(
            bootstrap_servers="127.0.0.1:1",
            security_protocol="SASL_SSL",
            sasl_mechanism="SCRAM-SHA-512",
            sasl_username="rtpipe",
            sasl_password=SecretStr(KAFKA_SECRET),
            ssl_ca_location=Path("/etc/ssl/certs/ca-certificates.crt"),
            ssl_key_password=SecretStr(KEY_SECRET),
        ),
        redis=RedisSettings(password=SecretStr(REDIS_SECRET), ssl=True),
    )


def test_client_config_carries_sasl_and_ssl(secure: Settings) -> None:
    conf = secure.kafka.client_config()
    assert conf["security.protocol"] == "SASL_SSL"
    assert conf["sasl.mechanism"] == "SCRAM-SHA-512"
    assert conf["sasl.username"] == "rtpipe"
    assert conf["sasl.password"] == KAFKA_SECRET
    assert conf["ssl.ca.location"] == "/etc/ssl/certs/ca-certificates.crt"
    assert conf["ssl.key.password"] == KEY_SECRET
    # Producers and consumers are built on top of it.
    for full in (producer_config(secure.kafka), consumer_config(secure.kafka, "g")):
        assert {k: full[k] for k in conf} == conf
    assert "password=" + REDIS_SECRET in secure.redis.feast_connection_string()
    assert "ssl=true" in secure.redis.feast_connection_string()


def test_redis_acl_user_and_ca_reach_redis_py_and_feast(tmp_path: Path) -> None:
    """The username, the CA and a client certificate reach redis-py's connections and, through
    the connection string, the keywords Feast's Redis store gives redis-py."""
    from feast.infra.online_stores.redis import RedisOnlineStore

    ca, cert, key = tmp_path / "ca.pem", tmp_path / "c.pem", tmp_path / "c.key"
    settings = RedisSettings(
        port=6390,
        username="rtpipe",
        password=SecretStr(REDIS_SECRET),
        ssl=True,
        ssl_ca_location=ca,
        ssl_certificate_location=cert,
        ssl_key_location=key,
    )
    conn = settings.client().connection_pool.connection_kwargs
    assert conn["username"] == "rtpipe" and conn["password"] == REDIS_SECRET
    assert conn["ssl_ca_certs"] == str(ca) and conn["ssl_cert_reqs"] == "required"
    assert conn["ssl_certfile"] == str(cert) and conn["ssl_keyfile"] == str(key)
    nodes, params = RedisOnlineStore._parse_connection_string(settings.feast_connection_string())
    assert nodes == [{"host": "127.0.0.1", "port": "6390"}]
    assert params == {
        "db": 0,
        "username": "rtpipe",
        "password": REDIS_SECRET,
        "ssl": True,
        "ssl_cert_reqs": "required",
        "ssl_check_hostname": True,
        "ssl_ca_certs": str(ca),
        "ssl_certfile": str(cert),
        "ssl_keyfile": str(key),
    }
    # A cluster client's node connections carry the same.
    cluster = settings.model_copy(update={"cluster": True}).connection_options()
    assert cluster["username"] == "rtpipe" and cluster["ssl_ca_certs"] == str(ca)
    with pytest.raises(ValueError, match="password contains a comma"):
        settings.model_copy(update={"password": SecretStr("a,b")}).feast_connection_string()


def test_plaintext_by_default() -> None:
    conf = KafkaSettings().client_config()
    assert conf["security.protocol"] == "PLAINTEXT"
    assert not any(k.startswith(("sasl.", "ssl.")) for k in conf)


def test_secrets_not_in_repr_or_dumps(secure: Settings) -> None:
    for text in (
        repr(secure),
        str(secure),
        repr(secure.kafka),
        repr(secure.redis),
        secure.model_dump_json(),
        str(secure.model_dump()),
    ):
        for secret in (KAFKA_SECRET, KEY_SECRET, REDIS_SECRET):
            assert secret not in text
    # Child processes do get them (settings_to_env), through the environment only.
    env = settings_to_env(secure)
    assert env["RTPIPE_KAFKA__SASL_PASSWORD"] == KAFKA_SECRET
    assert env["RTPIPE_REDIS__PASSWORD"] == REDIS_SECRET


def test_secrets_not_in_log_output(
    secure: Settings, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)
    logging.getLogger("rtpipe.test").info("settings %s / %r", secure, secure)
    # librdkafka logs its own errors (to stderr) for an unreachable SASL_SSL broker.
    producer = Producer(producer_config(secure.kafka, **{"log_level": 7}))
    producer.poll(0.5)
    producer.flush(0.1)
    out, err = capfd.readouterr()
    for text in (caplog.text, out, err):
        for secret in (KAFKA_SECRET, KEY_SECRET, REDIS_SECRET):
            assert secret not in text


def _calls(tree: ast.AST, names: set[str]) -> list[ast.Call]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", None)
            if name in names:
                found.append(node)
    return found


STAGE_SOURCES = sorted((REPO / "stages").rglob("*.py"))


@pytest.mark.parametrize("path", STAGE_SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_client_is_built_from_settings(path: Path) -> None:
    """Every Kafka client in stages/ takes its connection from ``KafkaSettings``
    (client_config, or producer_config/consumer_config on top of it) and every redis.Redis
    its credentials and TLS options from ``RedisSettings`` (``connection_options()``, or the
    password and TLS flag by name): nothing connects around the settings."""
    tree = ast.parse(path.read_text())
    for call in _calls(tree, {"Producer", "Consumer", "AdminClient"}):
        src = ast.unparse(call)
        assert any(f in src for f in ("client_config", "producer_config", "consumer_config")), (
            f"{path}:{call.lineno}: {src}"
        )
    for call in _calls(tree, {"Application"}):
        src = ast.unparse(call)
        assert "broker_address" in src, f"{path}:{call.lineno}: {src}"
    source = path.read_text()
    for call in _calls(tree, {"Redis"}):
        kwargs = {k.arg for k in call.keywords}
        spread = [ast.unparse(k.value) for k in call.keywords if k.arg is None]
        credentials = {"password", "ssl"} <= kwargs or any(
            "connection_options()" in s for s in spread
        )
        assert {"host", "port"} <= kwargs and credentials, f"{path}:{call.lineno}"
    if "Application(" in source:
        assert "from_librdkafka_dict(kafka.client_config())" in source


def test_metrics_bind_to_loopback_by_default() -> None:
    assert Settings().metrics.host == "127.0.0.1"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    build_metrics().serve(Settings().metrics.host, port)
    listening = Path("/proc/net/tcp").read_text().splitlines()[1:]
    local = {line.split()[1] for line in listening if line.split()[3] == "0A"}  # LISTEN
    assert f"0100007F:{port:04X}" in local
    assert f"00000000:{port:04X}" not in local

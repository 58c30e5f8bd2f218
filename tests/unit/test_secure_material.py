"""What ``rtpipe stack up --secure`` makes before any server starts: a CA and a server
certificate that verifies against it for 127.0.0.1 (server and client use), private files,
passwords kept across starts, the clients' variables, and server configs without a
plaintext port or a password on a command line."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

import pytest

from infra.stack import secure
from infra.stack.config import write_kafka_config
from stages.shared.settings import Settings


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    base = Settings(home=tmp_path / "home")
    return base.model_copy(update={"stack": base.stack.model_copy(update={"secure": True})})


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_material_is_private_verifiable_and_kept(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = secure.ensure_material(settings)
    assert _mode(m.dir) == 0o700
    for path in (m.dir / "ca.key", m.server_key, m.server_bundle, m.dir / "passwords.json"):
        assert _mode(path) == 0o600, path
    assert _mode(m.client_env) == 0o600
    for purpose in ("sslserver", "sslclient"):
        ok = subprocess.run(
            ["openssl", "verify", "-CAfile", str(m.ca), "-purpose", purpose,
             "-verify_ip", "127.0.0.1", str(m.server_cert)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert ok.returncode == 0, ok.stdout + ok.stderr
    passwords = {m.kafka_password, m.kafka_broker_password, m.redis_password}
    assert len(passwords | {m.redis_admin_password}) == 4
    # A second start keeps the passwords (Kafka's SCRAM users are in its formatted storage).
    again = secure.ensure_material(settings)
    assert again == m
    # client.env rebuilds the clients' settings that secure_client_settings gives.
    for line in m.client_env.read_text().splitlines():
        key, _, value = line.partition("=")
        monkeypatch.setenv(key, value)
    from_env = Settings(home=settings.home)
    wanted = secure.secure_client_settings(settings)
    assert from_env.kafka == wanted.kafka
    assert from_env.redis == wanted.redis
    assert wanted.kafka.security_protocol == "SASL_SSL"
    assert wanted.redis.username == "rtpipe" and wanted.redis.ssl_ca_location == m.ca


def test_server_configs_have_no_plaintext_port(settings: Settings) -> None:
    m = secure.ensure_material(settings)
    props = write_kafka_config(settings)
    assert _mode(props) == 0o600  # it holds the broker user's password
    lines = props.read_text().splitlines()
    listeners = f"listeners=SASL_SSL://127.0.0.1:{settings.stack.kafka_port},CONTROLLER://"
    assert any(ln.startswith(listeners) for ln in lines)
    assert "listener.security.protocol.map=CONTROLLER:SSL,SASL_SSL:SASL_SSL" in lines
    assert "listener.name.controller.ssl.client.auth=required" in lines
    assert not any("PLAINTEXT" in ln for ln in lines)
    redis_conf = secure.redis_config(settings, 6400, cluster=True).splitlines()
    assert "port 0" in redis_conf and "tls-port 6400" in redis_conf
    assert "user default off" in redis_conf
    assert {"tls-cluster yes", "tls-replication yes"} <= set(redis_conf)
    assert f"user rtpipe on >{m.redis_password} {secure.REDIS_USER_RULES}" in redis_conf
    # The SCRAM users go to the storage format through an argument file, not argv.
    args = secure.scram_format_args(settings)
    assert f"SCRAM-SHA-512=[name=rtpipe,password={m.kafka_password}]" in args


def test_no_material_says_what_to_run(settings: Settings) -> None:
    with pytest.raises(secure.StackError, match=r"rtpipe stack up --secure"):
        secure.load_material(settings)

"""A wrong password or an untrusted certificate ends a stage (or the check a tool runs first)
within seconds, with one line that names the server, what failed and the setting to check;
and the secure stack refuses what it should (plaintext clients, anonymous Redis users,
controller connections without a certificate, the pipeline user's dangerous commands)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from confluent_kafka.admin import AdminClient
from pydantic import SecretStr
from redis.backoff import NoBackoff
from redis.retry import Retry

from stages.ops.harness.processes import child_env
from stages.shared.connectivity import CredentialsError, check_kafka, check_redis
from stages.shared.settings import Settings
from tests.support import make_secure_settings

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
# A CA bundle that does not hold the stack's own CA: the servers' certificates are untrusted.
SYSTEM_CAS = Path("/etc/ssl/certs/ca-certificates.crt")


def _other_ca(tmp_path: Path) -> Path:
    """A CA of our own that signed nothing the stack serves."""
    ca = tmp_path / "other-ca.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(tmp_path / "other-ca.key"), "-out", str(ca), "-days", "1",
         "-subj", "/CN=not the stack CA"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    return ca


def _run_stage(settings: Settings, stage: str) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "stages.cli", "run", stage],
        cwd=REPO,
        env=child_env(settings),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return proc, time.monotonic() - started


def test_the_secure_stack_works_with_the_right_credentials(secure_stack: Settings) -> None:
    started = time.monotonic()
    check_kafka(secure_stack.kafka)
    check_redis(secure_stack.redis)
    assert time.monotonic() - started < 5
    client = secure_stack.redis.client()
    assert client.ping()
    # The pipeline's Redis user has no dangerous commands.
    with pytest.raises(redis.exceptions.NoPermissionError):
        client.flushall()
    client.close()


def test_a_stage_with_a_wrong_kafka_password_exits_at_once_in_one_line(
    secure_stack: Settings,
) -> None:
    wrong = secure_stack.kafka.model_copy(update={"sasl_password": SecretStr("not-the-password")})
    proc, seconds = _run_stage(secure_stack.model_copy(update={"kafka": wrong}), "routing")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    expected = (
        f"error: Kafka at {secure_stack.kafka.bootstrap_servers}: SASL authentication failed "
        "for user 'rtpipe' (check RTPIPE_KAFKA__SASL_USERNAME and RTPIPE_KAFKA__SASL_PASSWORD)"
    )
    assert lines[-1] == expected
    # One line: no traceback, no librdkafka retry lines, the password nowhere.
    assert [ln for ln in lines if "error" in ln.lower() or ln.startswith("%")] == [expected]
    assert "not-the-password" not in proc.stderr + proc.stdout
    assert seconds < 20, f"took {seconds:.1f} s"  # Python and the stage's imports: ~5 s


def test_a_stage_with_an_untrusted_redis_certificate_exits_at_once_in_one_line(
    secure_stack: Settings, tmp_path: Path
) -> None:
    other = _other_ca(tmp_path)
    untrusted = secure_stack.redis.model_copy(update={"ssl_ca_location": other})
    proc, seconds = _run_stage(secure_stack.model_copy(update={"redis": untrusted}), "prediction")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    expected = (
        f"error: Redis at 127.0.0.1:{secure_stack.redis.port}: TLS handshake failed: the "
        f"server's certificate is not trusted (check RTPIPE_REDIS__SSL_CA_LOCATION={other})"
    )
    assert lines[-1] == expected
    assert [ln for ln in lines if "error" in ln.lower() or ln.startswith("%")] == [expected]
    assert seconds < 20, f"took {seconds:.1f} s"


@pytest.mark.parametrize("ca", ["other", "system"])
def test_an_untrusted_kafka_certificate_fails_fast(
    secure_stack: Settings, tmp_path: Path, ca: str
) -> None:
    path = _other_ca(tmp_path) if ca == "other" else SYSTEM_CAS
    kafka = secure_stack.kafka.model_copy(update={"ssl_ca_location": path})
    started = time.monotonic()
    with pytest.raises(CredentialsError) as err:
        check_kafka(kafka)
    assert time.monotonic() - started < 5
    assert str(err.value) == (
        f"Kafka at {kafka.bootstrap_servers}: TLS handshake failed: the broker's certificate "
        f"is not trusted (check RTPIPE_KAFKA__SSL_CA_LOCATION={path})"
    )


@pytest.mark.parametrize("user", ["rtpipe", "default"])
def test_a_wrong_redis_password_fails_fast(secure_stack: Settings, user: str) -> None:
    wrong = secure_stack.redis.model_copy(
        update={
            "password": SecretStr("not-the-password"),
            "username": None if user == "default" else user,
        }
    )
    started = time.monotonic()
    with pytest.raises(CredentialsError) as err:
        check_redis(wrong)
    assert time.monotonic() - started < 5
    message = str(err.value)
    assert message.startswith(
        f"Redis at 127.0.0.1:{wrong.port}: authentication failed for user {user!r} ("
    )
    assert message.endswith("check RTPIPE_REDIS__USERNAME and RTPIPE_REDIS__PASSWORD)")
    assert "not-the-password" not in message
    assert "\n" not in message


def test_the_secure_stack_refuses_plaintext_and_anonymous_clients(secure_stack: Settings) -> None:
    port = secure_stack.redis.port
    # Redis: no plaintext port at all, and no anonymous user over TLS.
    plain = redis.Redis(port=port, socket_timeout=2, retry=Retry(NoBackoff(), 0))
    with pytest.raises(redis.ConnectionError):
        plain.ping()
    anonymous = redis.Redis(
        port=port,
        ssl=True,
        ssl_ca_certs=str(secure_stack.redis.ssl_ca_location),
        socket_timeout=2,
        retry=Retry(NoBackoff(), 0),
    )
    with pytest.raises(redis.AuthenticationError):
        anonymous.ping()
    # Kafka: a plaintext client gets no metadata from the SASL_SSL port, and the controller
    # port takes no TLS client without a certificate signed by the stack's CA.
    bootstrap = secure_stack.kafka.bootstrap_servers
    controller = int(bootstrap.rsplit(":", 1)[1]) + 1
    for conf in (
        {"bootstrap.servers": bootstrap},
        {
            "bootstrap.servers": f"127.0.0.1:{controller}",
            "security.protocol": "SSL",
            "ssl.ca.location": str(secure_stack.kafka.ssl_ca_location),
        },
    ):
        admin = AdminClient({**conf, "log_level": 0})
        with pytest.raises(Exception, match=r"transport failure|timed out"):
            admin.list_topics(timeout=2)


def test_no_password_on_a_command_line(secure_stack: Settings) -> None:
    from infra import stack
    from infra.stack.secure import load_material

    m = load_material(make_secure_settings())
    secrets = (m.kafka_password, m.kafka_broker_password, m.redis_password, m.redis_admin_password)
    pids = [st.pid for st in stack.status(make_secure_settings()).values() if st.pid]
    assert len(pids) == 2  # the broker and redis-server
    for pid in pids:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        assert not any(s in cmdline for s in secrets), pid

"""Secure mode of the stack (``stack.secure``, ``rtpipe stack up --secure``): the material it
makes and what the servers and the clients are given.

The stack makes, once per run dir, under ``run/secure/`` (directory 0700, secrets 0600)::

    ca.pem ca.key              a CA of its own (EC P-256, 825 days), trusted by every client
    server.pem server.key      one certificate for every server: SAN IP:127.0.0.1, localhost,
                               server and client use (the brokers' controller connections)
    server-bundle.pem          key + certificate in one file: Kafka's PEM keystore
    passwords.json             the generated passwords (Kafka's pipeline and broker users,
                               Redis' pipeline and admin users)
    client.env                 the ``RTPIPE_*`` variables a stage needs to connect

Kafka: the broker port speaks SASL_SSL with SCRAM-SHA-512, for clients and between brokers
(user ``rtpipe-broker``); the controller port speaks TLS with client certificates required
(KRaft cannot use SCRAM there: the credentials live in the metadata the controllers serve).
No port is left in plaintext. There is no authorizer: every authenticated user may do
anything, as the pipeline's one user needs topics, groups and transactional ids under
prefixes that change per test run; authentication is what keeps others out.
The SCRAM users are written into the storage at format time (``--add-scram``, from an
argument file so the passwords stay off the process list).

Redis: TLS only (``port 0``), client certificates not required, ``default`` user off, user
``rtpipe`` (the pipeline: every command but the ``@dangerous`` ones) and ``rtpipe-admin``
(the stack itself: health probes, ``redis-cli --cluster create``, replication).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from pydantic import SecretStr

from infra.stack.errors import StackError
from infra.stack.paths import run_dir, write_private
from stages.shared.settings import Settings

KAFKA_USER = "rtpipe"
KAFKA_BROKER_USER = "rtpipe-broker"
REDIS_USER = "rtpipe"
REDIS_ADMIN_USER = "rtpipe-admin"
SCRAM_MECHANISM = "SCRAM-SHA-512"
# What the pipeline's Redis user may run: data commands and scripts, not FLUSHALL, KEYS,
# CONFIG, DEBUG or SHUTDOWN; INFO for redis-py's and Feast's version checks.
REDIS_USER_RULES = "~* &* +@all -@dangerous +info"

_CERT_DAYS = 825


@dataclass(frozen=True)
class SecureMaterial:
    """The files and passwords of one run dir's secure mode."""

    dir: Path
    kafka_password: str
    kafka_broker_password: str
    redis_password: str
    redis_admin_password: str

    @property
    def ca(self) -> Path:
        return self.dir / "ca.pem"

    @property
    def server_cert(self) -> Path:
        return self.dir / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.dir / "server.key"

    @property
    def server_bundle(self) -> Path:
        return self.dir / "server-bundle.pem"

    @property
    def client_env(self) -> Path:
        return self.dir / "client.env"


def secure_dir(settings: Settings) -> Path:
    return run_dir(settings) / "secure"


def secure_env_file(settings: Settings) -> Path:
    """``client.env``: the ``RTPIPE_*`` variables of the pipeline's users (``. client.env``)."""
    return secure_dir(settings) / "client.env"


def _openssl(*args: str, cwd: Path) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        raise StackError(
            "openssl not found (needed to make the secure stack's certificates): "
            "`apt-get install openssl`"
        )
    proc = subprocess.run(
        [openssl, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        raise StackError(f"openssl {args[0]} failed: {tail}")


def _make_certificates(dir: Path) -> None:
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl(
        "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", str(_CERT_DAYS),
        "-subj", "/CN=rtpipe stack CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=dir,
    )  # fmt: skip
    _openssl(
        "req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1",
        cwd=dir,
    )  # fmt: skip
    (dir / "server.ext").write_text(
        "basicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        # Client use too: a broker presents it to the controllers (TLS with client auth).
        "extendedKeyUsage=serverAuth,clientAuth\n"
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
    )
    _openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-set_serial", str(secrets.randbits(63)), "-days", str(_CERT_DAYS),
        "-extfile", "server.ext", "-out", "server.pem",
        cwd=dir,
    )  # fmt: skip
    for name in ("ca.key", "server.key"):
        (dir / name).chmod(0o600)
    key = (dir / "server.key").read_text()
    write_private(dir / "server-bundle.pem", key + (dir / "server.pem").read_text())
    (dir / "server.csr").unlink()


def ensure_material(settings: Settings) -> SecureMaterial:
    """The run dir's secure material, made on first use and kept after (the SCRAM users are
    in Kafka's formatted storage, so the passwords must not change under it).

    Raises:
        StackError: openssl is missing or fails.
    """
    dir = secure_dir(settings)
    dir.mkdir(parents=True, exist_ok=True)
    dir.chmod(0o700)
    if not (dir / "server-bundle.pem").is_file():
        _make_certificates(dir)
    pw_file = dir / "passwords.json"
    if not pw_file.is_file():
        # URL-safe tokens: no comma (Feast's connection string), quote or space (configs).
        names = ("kafka", "kafka_broker", "redis", "redis_admin")
        fresh = {k: secrets.token_urlsafe(24) for k in names}
        write_private(pw_file, json.dumps(fresh, indent=2) + "\n")
    material = load_material(settings)
    write_private(
        material.client_env, "".join(f"{k}={v}\n" for k, v in client_env(material).items())
    )
    return material


def load_material(settings: Settings) -> SecureMaterial:
    """The material :func:`ensure_material` made for this run dir.

    Raises:
        StackError: the run dir has none (the stack was never started with ``--secure``).
    """
    dir = secure_dir(settings)
    try:
        pw = json.loads((dir / "passwords.json").read_text())
    except (OSError, ValueError) as exc:
        raise StackError(
            f"no secure-stack material in {dir} ({exc}): run `rtpipe stack up --secure`"
        ) from None
    return SecureMaterial(
        dir=dir,
        kafka_password=pw["kafka"],
        kafka_broker_password=pw["kafka_broker"],
        redis_password=pw["redis"],
        redis_admin_password=pw["redis_admin"],
    )


def client_env(material: SecureMaterial) -> dict[str, str]:
    """The ``RTPIPE_*`` variables that point a stage's clients at the secure stack (the
    addresses stay whatever ``RTPIPE_KAFKA__BOOTSTRAP_SERVERS``/``RTPIPE_REDIS__*`` say)."""
    return {
        "RTPIPE_KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
        "RTPIPE_KAFKA__SASL_MECHANISM": SCRAM_MECHANISM,
        "RTPIPE_KAFKA__SASL_USERNAME": KAFKA_USER,
        "RTPIPE_KAFKA__SASL_PASSWORD": material.kafka_password,
        "RTPIPE_KAFKA__SSL_CA_LOCATION": str(material.ca),
        "RTPIPE_REDIS__SSL": "true",
        "RTPIPE_REDIS__SSL_CA_LOCATION": str(material.ca),
        "RTPIPE_REDIS__USERNAME": REDIS_USER,
        "RTPIPE_REDIS__PASSWORD": material.redis_password,
    }


def secure_client_settings(settings: Settings) -> Settings:
    """``settings`` whose Kafka and Redis clients connect to this run dir's secure stack as
    the pipeline's users (what ``client.env`` sets)."""
    m = load_material(settings)
    kafka = settings.kafka.model_copy(
        update={
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": SCRAM_MECHANISM,
            "sasl_username": KAFKA_USER,
            "sasl_password": SecretStr(m.kafka_password),
            "ssl_ca_location": m.ca,
        }
    )
    redis = settings.redis.model_copy(
        update={
            "ssl": True,
            "ssl_ca_location": m.ca,
            "username": REDIS_USER,
            "password": SecretStr(m.redis_password),
        }
    )
    return settings.model_copy(update={"kafka": kafka, "redis": redis})


def kafka_probe_config(settings: Settings) -> dict[str, str]:
    """librdkafka settings of the stack's own probes: the pipeline user over SASL_SSL in
    secure mode, nothing in plaintext mode."""
    if not settings.stack.secure:
        return {}
    try:
        m = load_material(settings)
    except StackError:
        # No material yet: a probe that fails, as it should, rather than one that is refused.
        return {"security.protocol": "SASL_SSL", "sasl.mechanism": SCRAM_MECHANISM}
    return {
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": SCRAM_MECHANISM,
        "sasl.username": KAFKA_USER,
        "sasl.password": m.kafka_password,
        "ssl.ca.location": str(m.ca),
    }


def kafka_server_properties(
    settings: Settings, listener_port: int, controller_port: int
) -> list[str]:
    """The broker's listener and security lines in secure mode."""
    m = load_material(settings)
    jaas = (
        "org.apache.kafka.common.security.scram.ScramLoginModule required "
        f'username="{KAFKA_BROKER_USER}" password="{m.kafka_broker_password}";'
    )
    return [
        f"listeners=SASL_SSL://127.0.0.1:{listener_port},CONTROLLER://127.0.0.1:{controller_port}",
        f"advertised.listeners=SASL_SSL://127.0.0.1:{listener_port}",
        "controller.listener.names=CONTROLLER",
        "inter.broker.listener.name=SASL_SSL",
        "listener.security.protocol.map=CONTROLLER:SSL,SASL_SSL:SASL_SSL",
        f"sasl.enabled.mechanisms={SCRAM_MECHANISM}",
        f"sasl.mechanism.inter.broker.protocol={SCRAM_MECHANISM}",
        f"listener.name.sasl_ssl.{SCRAM_MECHANISM.lower()}.sasl.jaas.config={jaas}",
        # One PEM key and certificate for both listeners and for the brokers' own
        # connections to the controllers, which must present it (client auth required).
        "ssl.keystore.type=PEM",
        f"ssl.keystore.location={m.server_bundle}",
        "ssl.truststore.type=PEM",
        f"ssl.truststore.location={m.ca}",
        "listener.name.controller.ssl.client.auth=required",
        # A client that failed to authenticate is answered at once, not after a 1 s delay.
        "connection.failed.authentication.delay.ms=0",
    ]


def scram_format_args(settings: Settings) -> list[str]:
    """``kafka-storage format`` arguments that create the SCRAM users."""
    m = load_material(settings)
    return [
        "--add-scram",
        f"{SCRAM_MECHANISM}=[name={KAFKA_BROKER_USER},password={m.kafka_broker_password}]",
        "--add-scram",
        f"{SCRAM_MECHANISM}=[name={KAFKA_USER},password={m.kafka_password}]",
    ]


def redis_config(settings: Settings, port: int, *, cluster: bool) -> str:
    """The lines of a secure redis-server's private config file: TLS on ``port`` only, the
    ACL users, and for a cluster node TLS on the bus and replication links too."""
    m = load_material(settings)
    lines = [
        "port 0",
        f"tls-port {port}",
        f"tls-cert-file {m.server_cert}",
        f"tls-key-file {m.server_key}",
        f"tls-ca-cert-file {m.ca}",
        "tls-auth-clients no",
        "user default off",
        f"user {REDIS_USER} on >{m.redis_password} {REDIS_USER_RULES}",
        f"user {REDIS_ADMIN_USER} on >{m.redis_admin_password} ~* &* +@all",
    ]
    if cluster:
        lines += [
            "tls-cluster yes",
            "tls-replication yes",
            # The bus and replication links are TLS; the nodes authenticate as the admin.
            f"masteruser {REDIS_ADMIN_USER}",
            f'masterauth "{m.redis_admin_password}"',
        ]
    return "\n".join(lines) + "\n"


def redis_probe_options(settings: Settings) -> dict[str, object]:
    """redis-py keywords of the stack's own probes: the admin user over TLS in secure mode;
    the configured password otherwise."""
    if not settings.stack.secure:
        pw = settings.redis.password
        return {"password": pw.get_secret_value() if pw else None}
    try:
        m = load_material(settings)
    except StackError:
        return {"ssl": True}
    return {
        "ssl": True,
        "ssl_ca_certs": str(m.ca),
        "ssl_cert_reqs": "required",
        "username": REDIS_ADMIN_USER,
        "password": m.redis_admin_password,
    }


def redis_cli_args(settings: Settings) -> tuple[list[str], dict[str, str]]:
    """Extra ``redis-cli`` arguments and environment: TLS and the admin user in secure mode
    (the password in ``REDISCLI_AUTH``, off the process list)."""
    env = dict(os.environ)
    if not settings.stack.secure:
        if settings.redis.password:
            env["REDISCLI_AUTH"] = settings.redis.password.get_secret_value()
        return [], env
    m = load_material(settings)
    env["REDISCLI_AUTH"] = m.redis_admin_password
    return ["--tls", "--cacert", str(m.ca), "--user", REDIS_ADMIN_USER], env

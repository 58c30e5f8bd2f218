"""The start-up check of a stage's (or a tool's) credentials and certificates: a wrong
password or an untrusted certificate ends the process at once with one line that says what
failed and which setting to check.

Without it, librdkafka retries an authentication failure or a failed TLS handshake for ever
(logging a line per attempt) and the stage looks merely slow; redis-py's retries turn one
refused handshake into seconds of back-off per command. An unreachable server is not an
error here: the stages wait for a broker or a Redis that is starting, as before.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from stages.shared.errors import RtpipeError
from stages.shared.settings import KafkaSettings, RedisSettings, Settings

logger = logging.getLogger(__name__)

# librdkafka's words for a certificate the client does not trust (OpenSSL's error text).
_UNTRUSTED = ("certificate verify failed", "CERTIFICATE_VERIFY_FAILED")


class CredentialsError(RtpipeError, RuntimeError):
    """A server refused our credentials or our TLS handshake; the message is one line naming
    the server, what failed and the ``RTPIPE_*`` setting to check."""


def check_kafka(kafka: KafkaSettings, timeout_s: float = 10.0) -> None:
    """Connect to Kafka once as ``kafka`` says and fail on an authentication or TLS error.

    Returns as soon as the cluster answers, when no broker is reachable, or after
    ``timeout_s`` without an answer: those are not credentials problems (the broker may be
    starting), and the stage's own clients wait for it as before.

    Raises:
        CredentialsError: SASL authentication failed, or the TLS handshake did (an untrusted
            broker certificate above all).
    """
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import AdminClient

    errors: list[KafkaError] = []
    admin = AdminClient(
        {
            **kafka.client_config(),
            "error_cb": errors.append,
            # Our one line says it; librdkafka's own would repeat it per attempt on stderr.
            "log_level": 0,
        }
    )
    where = f"Kafka at {kafka.bootstrap_servers}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            admin.list_topics(timeout=0.5)
            return
        except KafkaException:
            pass
        # Callbacks (error_cb) are served by poll(); list_topics does not serve them.
        admin.poll(0.1)
        for err in errors:
            line = _kafka_failure(kafka, err)
            if line is not None:
                raise CredentialsError(f"{where}: {line}")
        if any(e.code() == KafkaError._ALL_BROKERS_DOWN for e in errors):
            # Down or starting, not refusing us: the stage's own clients wait for it.
            logger.warning("%s is unreachable; starting anyway", where)
            return
    logger.warning("%s did not answer within %.0f s; starting anyway", where, timeout_s)


def _kafka_failure(kafka: KafkaSettings, err: Any) -> str | None:
    """The sentence for a librdkafka error that no retry will cure, or None."""
    from confluent_kafka import KafkaError

    text = err.str()
    if err.code() == KafkaError._AUTHENTICATION and "SSL" not in text:
        return (
            f"SASL authentication failed for user {kafka.sasl_username!r} "
            "(check RTPIPE_KAFKA__SASL_USERNAME and RTPIPE_KAFKA__SASL_PASSWORD)"
        )
    if any(u in text for u in _UNTRUSTED):
        return (
            "TLS handshake failed: the broker's certificate is not trusted "
            f"(check RTPIPE_KAFKA__SSL_CA_LOCATION={kafka.ssl_ca_location or 'system CAs'})"
        )
    if err.code() in (KafkaError._SSL, KafkaError._AUTHENTICATION) or "SSL handshake" in text:
        return f"TLS handshake failed: {text.split(': ', 2)[-1]} (check RTPIPE_KAFKA__SSL_*)"
    return None


def check_redis(redis_settings: RedisSettings, timeout_s: float = 5.0) -> None:
    """Connect to the first Redis node that answers as ``redis_settings`` say and fail on an
    authentication or TLS error (for a cluster, each node has the same users and
    certificates).

    Raises:
        CredentialsError: the user or password is refused, or the TLS handshake fails.
    """
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    for host, port in redis_settings.nodes():
        where = f"Redis at {host}:{port}"
        client = redis.Redis(
            host=host,
            port=port,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            # One attempt: redis-py's default retries make a refused handshake take seconds.
            retry=Retry(NoBackoff(), 0),
            **redis_settings.connection_options(),
        )
        try:
            client.ping()
            return
        except (redis.AuthenticationError, redis.exceptions.NoPermissionError) as exc:
            user = redis_settings.username or "default"
            raise CredentialsError(
                f"{where}: authentication failed for user {user!r} ({exc}; check "
                "RTPIPE_REDIS__USERNAME and RTPIPE_REDIS__PASSWORD)"
            ) from None
        except redis.ResponseError as exc:
            if "NOAUTH" in str(exc) or "WRONGPASS" in str(exc):
                raise CredentialsError(
                    f"{where}: {exc} (check RTPIPE_REDIS__USERNAME and RTPIPE_REDIS__PASSWORD)"
                ) from None
            raise
        except redis.ConnectionError as exc:
            text = str(exc)
            if any(u in text for u in _UNTRUSTED):
                raise CredentialsError(
                    f"{where}: TLS handshake failed: the server's certificate is not trusted "
                    "(check RTPIPE_REDIS__SSL_CA_LOCATION="
                    f"{redis_settings.ssl_ca_location or 'system CAs'})"
                ) from None
            if "SSL" in text:
                raise CredentialsError(
                    f"{where}: TLS handshake failed ({text}; check RTPIPE_REDIS__SSL*)"
                ) from None
            # Unreachable (down, starting): the next node, or start and wait as before.
            logger.warning("%s: %s", where, text)
        except redis.TimeoutError as exc:
            logger.warning("%s: %s", where, exc)
        finally:
            client.close()


def check_credentials(settings: Settings) -> None:
    """:func:`check_kafka` and :func:`check_redis` on the process's settings.

    Raises:
        CredentialsError: see the two checks.
    """
    check_kafka(settings.kafka)
    check_redis(settings.redis)

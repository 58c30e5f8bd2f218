"""What a transactional loop does when a Kafka transaction fails: resume the call, abort
and re-read, or replace both clients (the policy, tested against librdkafka's own error
objects in tests/unit/test_txn_recovery.py), and the bounded consumer close that replacing
them needs. Used by :class:`~stages.shared.batch_loop.TransactionalBatchLoop`."""

from __future__ import annotations

import logging
import threading
from typing import Literal

from confluent_kafka import Consumer, KafkaError, KafkaException

logger = logging.getLogger(__name__)

# How long the loop keeps resuming a commit or retrying an abort that fails with a retriable
# error (the broker restarting) before it replaces both clients instead. Replacing them is
# always safe: the new producer takes the transactional id over (the broker completes or
# aborts what the old one left) and the new consumer re-reads from the committed offsets.
TXN_RECOVERY_S = 60.0
# A consumer whose close() has not returned by then is abandoned (logged): a hung close
# must not stop the stage from replacing its clients or from exiting on SIGTERM.
CONSUMER_CLOSE_TIMEOUT_S = 20.0

TxnAction = Literal["resume", "abort", "replace"]


def txn_failure_action(
    err: object, call: Literal["commit", "abort"], elapsed_s: float, stopping: bool
) -> TxnAction:
    """What the batch loop does after a transactional call raised ``err``.

    ``resume``: call the same API again (librdkafka keeps a retriable commit or abort going
    in the background, and until it is resumed every other transactional call fails with
    ``_CONFLICT``); ``abort``: abort the transaction and re-read its batches; ``replace``:
    new clients (fatal errors, a conflict with a call that is still current, or recovery
    that has taken ``TXN_RECOVERY_S`` or outlived a stop request).
    """
    if not isinstance(err, KafkaError) or err.fatal() or err.code() == KafkaError._FATAL:
        return "replace"
    if stopping or elapsed_s >= TXN_RECOVERY_S:
        return "replace"
    if call == "abort":
        if err.code() == KafkaError._CONFLICT or not err.retriable():
            return "replace"
        return "resume"
    if err.txn_requires_abort() or not err.retriable():
        return "abort"
    return "resume"


def replacement_error(reason: str, cause: object) -> KafkaException:
    """A fatal error that makes the batch loop replace its clients (see ``run``)."""
    return KafkaException(KafkaError(KafkaError._FATAL, f"{reason}: {cause}", fatal=True))


def close_consumer(consumer: Consumer, stage: str, timeout_s: float) -> bool:
    """``consumer.close()`` with a bound: in a daemon thread, abandoned (and logged) if it
    has not returned within ``timeout_s``. Returns whether it returned."""
    errors: list[BaseException] = []

    def work() -> None:
        try:
            consumer.close()
        except (KafkaException, RuntimeError) as exc:
            errors.append(exc)

    closer = threading.Thread(target=work, name=f"{stage}-consumer-close", daemon=True)
    closer.start()
    closer.join(timeout_s)
    if closer.is_alive():
        logger.error("%s consumer close did not return within %.0fs: abandoned", stage, timeout_s)
        return False
    for exc in errors:
        logger.warning("%s consumer close: %s", stage, exc)
    return True


def is_fatal(exc: KafkaException) -> bool:
    """The client that raised ``exc`` cannot go on: the loop replaces it."""
    err = exc.args[0] if exc.args else None
    if isinstance(err, KafkaError) and err.code() == KafkaError._FATAL:
        # What a consumer's message says once its client hit a fatal error (e.g. a static
        # member fenced by another with its group.instance.id): fatal() is False on it.
        return True
    return bool(getattr(err, "fatal", lambda: False)())

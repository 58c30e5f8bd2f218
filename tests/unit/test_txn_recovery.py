"""The batch loop's decision after a failed transactional call (stages/shared/txn.py),
with librdkafka's own error objects. CI once hung here for four minutes: a commit that
timed out while the broker restarted stays current in librdkafka, every abort after it
fails with a retriable _CONFLICT, and the loop retried that abort forever."""

from __future__ import annotations

import pytest
from confluent_kafka import KafkaError

from stages.shared.txn import TXN_RECOVERY_S, is_fatal, replacement_error, txn_failure_action


def _err(code: int, **flags: bool) -> KafkaError:
    return KafkaError(code, "test", **flags)


def test_retriable_commit_is_resumed() -> None:
    timed_out = _err(KafkaError._TIMED_OUT, retriable=True)
    assert txn_failure_action(timed_out, "commit", 1.0, stopping=False) == "resume"


def test_commit_that_requires_abort_is_aborted() -> None:
    abortable = _err(KafkaError._TIMED_OUT, retriable=True, txn_requires_abort=True)
    assert txn_failure_action(abortable, "commit", 1.0, stopping=False) == "abort"
    state = _err(KafkaError._STATE)
    assert txn_failure_action(state, "commit", 1.0, stopping=False) == "abort"


def test_abort_conflicting_with_a_current_commit_replaces_the_clients() -> None:
    conflict = _err(KafkaError._CONFLICT, retriable=True)
    assert txn_failure_action(conflict, "abort", 0.0, stopping=False) == "replace"


def test_retriable_abort_is_retried_until_the_recovery_budget() -> None:
    timed_out = _err(KafkaError._TIMED_OUT, retriable=True)
    assert txn_failure_action(timed_out, "abort", 1.0, stopping=False) == "resume"
    assert txn_failure_action(timed_out, "abort", TXN_RECOVERY_S, stopping=False) == "replace"
    assert txn_failure_action(timed_out, "commit", TXN_RECOVERY_S, stopping=False) == "replace"


def test_stop_request_ends_recovery() -> None:
    timed_out = _err(KafkaError._TIMED_OUT, retriable=True)
    assert txn_failure_action(timed_out, "abort", 0.0, stopping=True) == "replace"
    assert txn_failure_action(timed_out, "commit", 0.0, stopping=True) == "replace"


@pytest.mark.parametrize("call", ["commit", "abort"])
def test_fatal_errors_replace_the_clients(call: str) -> None:
    fenced = _err(KafkaError.INVALID_TXN_STATE, fatal=True)
    assert txn_failure_action(fenced, call, 0.0, stopping=False) == "replace"  # type: ignore[arg-type]
    consumer_fatal = _err(KafkaError._FATAL)
    assert txn_failure_action(consumer_fatal, call, 0.0, stopping=False) == "replace"  # type: ignore[arg-type]
    assert txn_failure_action("not an error", call, 0.0, stopping=False) == "replace"  # type: ignore[arg-type]


def test_replacement_error_is_fatal_for_the_loop() -> None:
    exc = replacement_error("abort failed", _err(KafkaError._CONFLICT, retriable=True))
    assert is_fatal(exc)
    assert "abort failed" in str(exc.args[0])

"""The stack's error: a component cannot be prepared, started, checked or stopped."""

from __future__ import annotations

from stages.shared.errors import RtpipeError


class StackError(RtpipeError, RuntimeError):
    """A component cannot be prepared, started, checked or stopped; the message says why."""

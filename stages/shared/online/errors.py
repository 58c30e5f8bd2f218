"""Errors of the online store package."""

from __future__ import annotations

from stages.shared.errors import RtpipeError


class FeatureLayoutError(RtpipeError, ValueError):
    """The registry or a request does not fit the online layout this package implements."""

    def __init__(self, what: str, detail: str) -> None:
        super().__init__(f"{what}: {detail}")
        self.what = what
        self.detail = detail


class OnlineWriteError(RtpipeError, RuntimeError):
    """A batched online write failed in Redis."""

    def __init__(self, view: str, rows: int, detail: str) -> None:
        super().__init__(f"online write to {view} ({rows} rows) failed: {detail}")
        self.view = view
        self.rows = rows
        self.detail = detail

"""The model registry's exceptions (:mod:`training.registry`, :mod:`training.card`)."""

from __future__ import annotations

from stages.shared.errors import RtpipeError


class RegistryError(RtpipeError, RuntimeError):
    """The registry is missing something that was asked for."""


class ModelIntegrityError(RegistryError):
    """``model.txt`` does not match the sha256 recorded at registration."""

    def __init__(self, version: str, expected: str, actual: str) -> None:
        super().__init__(f"model {version}: sha256 {actual} does not match recorded {expected}")
        self.version = version
        self.expected = expected
        self.actual = actual


class ModelCardError(RegistryError):
    """A version's metadata lacks a required key or holds a key of the wrong type."""

    def __init__(self, version: str, key: str, problem: str) -> None:
        super().__init__(f"model {version}: metadata key {key!r} {problem}")
        self.version = version
        self.key = key
        self.problem = problem

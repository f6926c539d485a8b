"""Typed errors. The CLI turns them into a one-line message and an exit code."""

from __future__ import annotations


class AbkdError(Exception):
    """Base class of every error this package raises on purpose.

    The CLI prints ``error: <message>`` and exits with :attr:`exit_code`.
    """

    exit_code: int = 1


class ConfigError(AbkdError):
    """A bad value given by the user (unknown name, out-of-range option): exit code 2."""

    exit_code = 2


class DatasetError(AbkdError):
    """A dataset could not be loaded: missing or malformed files."""


class CheckpointError(AbkdError):
    """A checkpoint or run directory is missing, malformed or does not fit the data."""


class ExportError(AbkdError):
    """An export could not be produced."""


class ValidationError(ExportError):
    """An exported artifact disagrees with the PyTorch model beyond the tolerance."""


class DeviceError(AbkdError):
    """The requested device / execution provider is not usable."""


class ServeError(AbkdError):
    """A serving request or artifact is invalid."""

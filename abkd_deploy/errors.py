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


class OutputNamesMismatch(ValidationError):
    """The outputs an artifact declares are not the expected names (missing, extra, order)."""


class OutputCountMismatch(ValidationError):
    """An artifact returned more or fewer outputs than expected."""


class OutputShapeMismatch(ValidationError):
    """An artifact output has another shape than the PyTorch model's."""


class ValuesMismatch(ValidationError):
    """An artifact output differs from the PyTorch model's by more than ``atol``."""


def first_line(exc: BaseException) -> str:
    """The first non-blank line of ``exc``'s message, or its type name when it has none.

    How a foreign exception (onnxruntime, safetensors, torch.export) is quoted in a
    one-line error.
    """
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__


class DeviceError(AbkdError):
    """The requested device / execution provider is not usable."""


class ServeError(AbkdError):
    """A serving request or artifact is invalid."""


class DistributedError(AbkdError):
    """A rank of a distributed run failed (the message names the rank)."""

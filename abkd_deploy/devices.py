"""The torch device of ``--device`` (training, export, the PyTorch bench workers).

The serving path picks onnxruntime providers instead (:mod:`abkd_deploy.serve.providers`).
"""

from __future__ import annotations

from typing import Any

from abkd_deploy.errors import ConfigError, DeviceError


def resolve_device(device: str) -> Any:
    """Maps ``auto|cpu|cuda|cuda:N`` to a :class:`torch.device`.

    Raises:
        DeviceError: ``cuda`` was asked for but CUDA is not available (no silent CPU run).
        ConfigError: the string is not a device name.
    """
    import torch

    name = str(device).lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise DeviceError(
                f"--device {device} was requested but CUDA is not available "
                f"(torch {torch.__version__}, built with CUDA {torch.version.cuda}); "
                "use --device cpu or auto"
            )
        return torch.device(name)
    raise ConfigError(f"unknown device {device!r}; expected auto, cpu, cuda or cuda:N")

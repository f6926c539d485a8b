"""Explicit onnxruntime execution-provider choice: ``cpu``, ``cuda[:N]`` or ``auto``.

onnxruntime silently runs on CPU when the CUDA provider is listed but cannot start
(missing CUDA/cuDNN libraries, no GPU). This module checks ``session.get_providers()``
after the session exists: ``cuda`` that does not really run on CUDA is a
:class:`~abkd_deploy.errors.DeviceError`; ``auto`` prefers CUDA, falls back to CPU and
says which provider runs.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import onnxruntime as ort

from abkd_deploy.errors import ConfigError, DeviceError, first_line

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SessionInfo:
    """An onnxruntime session and how it was placed.

    Attributes:
        session: the inference session.
        provider: the provider that runs the model (first of ``session.get_providers()``).
        device_id: CUDA device ordinal (0 on CPU).
        note: why ``auto`` fell back to CPU, or ``""``.
    """

    session: ort.InferenceSession
    provider: str
    device_id: int
    note: str = ""

    @property
    def on_cuda(self) -> bool:
        """Whether the model runs on the CUDA provider."""
        return self.provider == CUDA


def parse_device(device: str) -> tuple[str, int]:
    """Splits ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` into ``(kind, device_id)``.

    Raises:
        ConfigError: not one of those names.
    """
    name = str(device).strip().lower()
    if name in ("cpu", "auto", "cuda"):
        return name, 0
    if name.startswith("cuda:") and name[5:].isdigit():
        return "cuda", int(name[5:])
    raise ConfigError(f"unknown device {device!r}; expected auto, cpu, cuda or cuda:N")


def session_options(threads: int | None = None, spinning: bool | None = None) -> ort.SessionOptions:
    """Session options: all graph optimisations, ``threads`` intra-op threads.

    Args:
        threads: intra-op threads; ``None`` lets onnxruntime use one per physical core.
        spinning: whether idle intra-op threads busy-wait for work
            (``session.intra_op.allow_spinning``); ``None``: onnxruntime's default (on).

    Raises:
        ConfigError: ``threads`` is below 1.
    """
    if threads is not None and int(threads) < 1:
        raise ConfigError(f"threads must be >= 1, got {threads}")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if threads is not None:
        opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    if spinning is not None:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return opts


def _try_cuda(
    model_path: str | bytes, opts: ort.SessionOptions, device_id: int
) -> tuple[ort.InferenceSession | None, str]:
    """Creates a CUDA session; returns ``(session, "")`` or ``(None, why it is not CUDA)``."""
    available = ort.get_available_providers()
    if CUDA not in available:
        return None, (
            f"onnxruntime {ort.__version__} has no {CUDA} (available: {', '.join(available)}); "
            "install onnxruntime-gpu instead of onnxruntime"
        )
    try:
        session = ort.InferenceSession(
            model_path, sess_options=opts, providers=[(CUDA, {"device_id": device_id}), CPU]
        )
    except Exception as exc:  # onnxruntime raises plain RuntimeError/Fail here
        return None, f"{CUDA} failed to start: {first_line(exc)}"
    running = session.get_providers()
    if CUDA not in running:
        return None, (
            f"{CUDA} is listed but the session runs on {', '.join(running)} "
            "(CUDA/cuDNN libraries or GPU missing)"
        )
    return session, ""


def create_session(
    model_path: str | os.PathLike[str] | bytes,
    device: str = "auto",
    threads: int | None = None,
    spinning: bool | None = None,
    external_dir: str | os.PathLike[str] | None = None,
) -> SessionInfo:
    """Creates an inference session on the requested device.

    Args:
        model_path: the ``.onnx`` file (external data next to it is found by onnxruntime),
            or a serialized model.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA if it really runs, else CPU).
        threads: intra-op threads (``None``: onnxruntime's default).
        spinning: idle intra-op threads busy-wait (``None``: onnxruntime's default).
        external_dir: where a serialized model's external data files are (onnxruntime
            >= 1.21, ``session.model_external_initializers_file_folder_path``).

    Returns:
        The session and the provider that runs it.

    Raises:
        DeviceError: ``cuda`` was asked for and the session cannot run on CUDA.
        ConfigError: unknown device name or bad thread count.
    """
    kind, device_id = parse_device(device)
    opts = session_options(threads, spinning)
    if external_dir is not None:
        opts.add_session_config_entry(
            "session.model_external_initializers_file_folder_path", os.fspath(external_dir)
        )
    path = model_path if isinstance(model_path, bytes) else os.fspath(model_path)
    note = ""
    if kind in ("cuda", "auto"):
        session, why = _try_cuda(path, opts, device_id)
        if session is not None:
            return SessionInfo(session, CUDA, device_id)
        if kind == "cuda":
            raise DeviceError(f"--device {device} cannot run on CUDA: {why}; use --device cpu")
        note = f"auto: using CPU because {why}"
        log.info(note)
    session = ort.InferenceSession(path, sess_options=opts, providers=[CPU])
    return SessionInfo(session, session.get_providers()[0], 0, note)

"""Weights-only model checkpoints: ``NAME.safetensors`` + ``NAME.json`` (the config).

No pickle is ever loaded: weights come from safetensors, the config from JSON.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from abkd_deploy.errors import CheckpointError, ConfigError, first_line
from abkd_deploy.files import atomic_path, sha256_file, write_json
from abkd_deploy.models.base import GNN

CHECKPOINT_VERSION = 1


def save_model(
    model: GNN, directory: str | Path, name: str, extra: dict[str, Any] | None = None
) -> Path:
    """Writes ``directory/name.safetensors`` and ``directory/name.json`` atomically.

    ``name.json`` records the weights' SHA-256 (``weights_sha256``); :func:`load_model`
    refuses weights that do not match it.

    Args:
        model: The model (its :attr:`GNN.config` is stored).
        directory: Output directory (created).
        name: File stem, e.g. ``teacher`` or ``student``.
        extra: More JSON-serialisable fields stored with the config (e.g. dataset name).

    Returns:
        Path of the weights file.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / f"{name}.safetensors"
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(weights) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "arch": model.arch})
    write_json(
        directory / f"{name}.json",
        {
            "checkpoint_version": CHECKPOINT_VERSION,
            "model": model.config,
            "weights_sha256": sha256_file(weights),
            **(extra or {}),
        },
    )
    return weights


def read_model_config(directory: str | Path, name: str) -> dict[str, Any]:
    """Reads ``directory/name.json``; raises :class:`CheckpointError` if absent/corrupt."""
    path = Path(directory) / f"{name}.json"
    if not path.is_file():
        raise CheckpointError(f"no {name} checkpoint in {str(directory)!r}: {path.name} is missing")
    try:
        meta = json.loads(path.read_text())
        meta["model"]["arch"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path} is not a valid checkpoint config ({exc})") from None
    return meta


def load_model(directory: str | Path, name: str) -> tuple[GNN, dict[str, Any]]:
    """Rebuilds and loads ``directory/name`` (see :func:`save_model`).

    Returns:
        ``(model in eval mode, metadata dict)``.

    Raises:
        CheckpointError: files missing, unreadable, or weights not matching the config.
    """
    from abkd_deploy.models import build_model

    meta = read_model_config(directory, name)
    weights = Path(directory) / f"{name}.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"no {name} weights in {str(directory)!r}: {weights.name} is missing")
    try:
        model = build_model(**meta["model"])
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"{name}.json describes no valid model: {exc}") from None
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read {weights}: {exc}") from None
    recorded = meta.get("weights_sha256")
    if recorded is not None and sha256_file(weights) != recorded:
        raise CheckpointError(
            f"{weights} does not match the weights_sha256 recorded in {name}.json: the two "
            "files come from different runs"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = first_line(exc)
        raise CheckpointError(f"{weights} does not match {name}.json: {first}") from None
    return model.eval(), meta

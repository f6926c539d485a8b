"""Checking and parsing the options of an export (one-line ConfigErrors)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from abkd_deploy import staging
from abkd_deploy.data.ell import parse_fanout
from abkd_deploy.errors import ConfigError
from abkd_deploy.export.formats import DTYPES, ArtifactFormat, format_names, get_format

if TYPE_CHECKING:
    from abkd_deploy.export.adjacency import AdjacencyFormat

MIN_OPSET = 16
#: Default ``atol`` per artifact dtype.
DEFAULT_ATOL = {"float32": 1e-4, "float16": 1e-2}


def parse_fanouts(
    value: str | int | Sequence[int | str], num_layers: int, max_degree: int
) -> list[int]:
    """``"10,5"`` / ``[10, 5]`` / ``"max"`` / ``7`` -> one ``K`` per layer.

    Raises:
        ConfigError: a bad value, or a count that is neither 1 nor ``num_layers``.
    """
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",") if p.strip()]
    elif isinstance(value, int):
        parts = [value]
    else:
        parts = list(value)
    if len(parts) == 1:
        parts = parts * num_layers
    if len(parts) != num_layers:
        raise ConfigError(
            f"fanout {value!r} has {len(parts)} values but the student has {num_layers} "
            f"layers; expected 1 or {num_layers} comma-separated values (or 'max')"
        )
    return [parse_fanout(p, max_degree) for p in parts]


def resolve_formats(formats: Sequence[str] | str) -> list[ArtifactFormat]:
    """Registered formats for ``formats`` (names, de-duplicated, order kept)."""
    names = [formats] if isinstance(formats, str) else list(formats)
    if not names:
        known = ", ".join(format_names())
        raise ConfigError(f"no export format given; expected one or more of {known}")
    out: list[ArtifactFormat] = []
    for name in names:
        fmt = get_format(name)
        if fmt not in out:
            out.append(fmt)
    return out


def check_options(adjacency: AdjacencyFormat, opset: int, dtype: str, atol: float | None) -> float:
    """Checks opset and dtype for ``adjacency``; returns the resolved ``atol``."""
    if int(opset) < MIN_OPSET:
        raise ConfigError(
            f"opset {opset} is not supported; expected >= {MIN_OPSET} (default 18): older "
            "opsets turn scatter-add into an overwrite and give silently wrong results"
        )
    if int(opset) < adjacency.min_opset:
        raise ConfigError(
            f"{adjacency.name} adjacency needs opset >= {adjacency.min_opset} "
            f"({adjacency.opset_reason}); got {opset}"
        )
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; expected one of: {', '.join(DTYPES)}")
    atol = DEFAULT_ATOL[dtype] if atol is None else float(atol)
    if not atol >= 0:
        raise ConfigError(f"atol={atol}; expected >= 0")
    return atol


def check_quantize(quantize: str | None, adjacency: str, dtype: str) -> tuple[str, float]:
    """Checks ``quantize`` (``None``/``"none"``/``"int8"``) against the adjacency and dtype.

    Returns:
        ``(mode, rtol)``: the normalised mode and the relative validation tolerance it adds
        (0 for ``none``; :data:`~abkd_deploy.export.quantize.INT8_RTOL` of each output's
        scale for ``int8``).

    Raises:
        ConfigError: an unknown mode or a combination that cannot be exported (one line).
    """
    from abkd_deploy.export.quantize import INT8_RTOL, quantize_mode, refuse_quantize

    mode = quantize_mode(quantize)
    reason = refuse_quantize(mode, adjacency, dtype)
    if reason:
        raise ConfigError(reason)
    return mode, (INT8_RTOL if mode == "int8" else 0.0)


def check_supported(
    adjacency: AdjacencyFormat, formats: Sequence[ArtifactFormat], dtype: str, arch: str
) -> None:
    """Refuses a dtype that the adjacency (for ``arch``) or one of the formats cannot export.

    Raises:
        ConfigError: the first reason given by ``adjacency.refuse_dtype`` or a format's
            ``refuse_dtype`` (one line, with the option to change).
    """
    reasons = [adjacency.refuse_dtype(dtype, arch)]
    reasons += [fmt.refuse_dtype(dtype, adjacency) for fmt in formats]
    reason = next((r for r in reasons if r), None)
    if reason:
        raise ConfigError(reason)


def check_out_dir(out_dir: Path, force: bool, run_dir: Path | None = None) -> None:
    """Refuses an ``out_dir`` that overlaps ``run_dir``, exists without ``force`` or is not
    a previous export to replace (:func:`abkd_deploy.staging.check_out_dir`)."""
    staging.check_out_dir(out_dir, force, sources=[run_dir])

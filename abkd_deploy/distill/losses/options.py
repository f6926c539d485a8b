"""Checking loss-term options: numbers, choices and (student, teacher) layer pairs.

Options may come from Python (ints, floats, lists of tuples) or from a command line as
strings (``"4"``, ``"0:7,1:15"``); every helper accepts both and raises
:class:`~abkd_deploy.errors.ConfigError` naming the option when the value does not fit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from abkd_deploy.errors import ConfigError

from .base import LayerDims, proportional_layer


def as_float(
    term: str, key: str, value: Any, *, low: float | None = None, strict: bool = False
) -> float:
    """``value`` as a float, at least ``low`` (strictly above it when ``strict``)."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{term}: option {key}={value!r} is not a number") from None
    if out != out or out in (float("inf"), float("-inf")):
        raise ConfigError(f"{term}: option {key}={value!r} must be finite")
    if low is not None and (out < low or (strict and out == low)):
        relation = ">" if strict else ">="
        raise ConfigError(f"{term}: option {key}={value!r} must be {relation} {low}")
    return out


def as_int(term: str, key: str, value: Any, *, low: int = 1) -> int:
    """``value`` as an int, at least ``low``."""
    try:
        out = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{term}: option {key}={value!r} is not an integer") from None
    if isinstance(value, float) and value != out:
        raise ConfigError(f"{term}: option {key}={value!r} is not an integer")
    if out < low:
        raise ConfigError(f"{term}: option {key}={value!r} must be >= {low}")
    return out


def as_choice(term: str, key: str, value: Any, choices: Sequence[str]) -> str:
    """``value`` lower-cased, one of ``choices``."""
    out = str(value).lower()
    if out not in choices:
        raise ConfigError(f"{term}: option {key}={value!r}; expected one of: {', '.join(choices)}")
    return out


def as_pairs(
    term: str, value: Any, dims: LayerDims, default: list[tuple[int, int]]
) -> list[tuple[int, int]]:
    """Layer pairs ``[(student_layer, teacher_layer), ...]`` with indices made non-negative.

    Args:
        term: Loss name, for messages.
        value: ``None`` (use ``default``), a sequence of 2-sequences, or a string
            ``"s:t,s:t"``. Negative indices count from the last layer.
        dims: Layer widths, to check the indices.
        default: Pairs used when ``value`` is ``None``.

    Raises:
        ConfigError: Malformed pairs or an index out of range.
    """
    raw: Any = default if value is None else value
    if isinstance(raw, str):
        try:
            raw = [tuple(int(x) for x in p.split(":")) for p in raw.split(",") if p.strip()]
        except ValueError:
            raise ConfigError(f"{term}: option pairs={value!r}; expected 's:t,s:t'") from None
    if isinstance(raw, Sequence) and len(raw) == 2 and all(isinstance(x, int) for x in raw):
        raw = [raw]  # a single pair given as (s, t)
    out: list[tuple[int, int]] = []
    try:
        for pair in raw:
            s, t = (int(x) for x in pair)
            out.append((s, t))
    except (TypeError, ValueError):
        raise ConfigError(f"{term}: option pairs={value!r}; expected [(s, t), ...]") from None
    if not out:
        raise ConfigError(f"{term}: option pairs is empty")
    n_s, n_t = len(dims.student), len(dims.teacher)
    fixed = []
    for s, t in out:
        if not (-n_s <= s < n_s and -n_t <= t < n_t):
            raise ConfigError(
                f"{term}: layer pair ({s}, {t}) out of range for {n_s} student and "
                f"{n_t} teacher layers"
            )
        fixed.append((s % n_s, t % n_t))
    return fixed


def proportional_pairs(dims: LayerDims) -> list[tuple[int, int]]:
    """Every student layer with the teacher layer at the same relative depth."""
    n_s, n_t = len(dims.student), len(dims.teacher)
    return [(j, proportional_layer(j, n_s, n_t)) for j in range(n_s)]

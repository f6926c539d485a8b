"""The distillation objective: a weighted sum of registered loss terms.

``Objective.from_method("abkd", dims, alpha=0.7, tau=4, beta=1)`` builds the preset of a KD
method (:data:`METHODS`); ``Objective.from_weights({"ce": 0.3, "kd": 0.7, "lsp": 1}, dims)``
builds any combination. Calling the objective on a :class:`KDBatch` returns the total and
the raw value of every term::

    total, values = objective(batch)   # values: {"ce": 0.9, "kd": 0.4, "abkd": 0.7}

Terms other than ``ce`` and ``kd`` are auxiliary: they can be normalised (a scale fixed at
the first training call so that their magnitude equals the ``kd`` term's: the scale of
L_att against the KD term decides the outcome) and warmed up (weight ramped from 0 to
``beta`` over ``warmup_epochs``); docs/ARCHITECTURE.md section 6. ``objective.parameters()``
are the distillation-only parameters (regressors, heads, attention): they are trained with
the student but are no part of it.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from abkd_deploy.errors import ConfigError
from abkd_deploy.registry import Registry

from .losses import LOSSES, KDBatch, LayerDims

#: Terms that are not auxiliary (never normalised nor warmed up).
BASE_TERMS = ("ce", "kd")
#: A method preset: ``(alpha, beta) -> {term: weight}``.
Preset = Callable[[float, float], dict[str, float]]
METHODS: Registry[Preset] = Registry("KD method")
#: Smallest magnitude trusted for normalisation.
_EPS = 1e-12
#: Warm-up (epochs) used when ``warmup_epochs`` is None: 20 when ``abkd`` is a term, else 0.
#: Why ABKD needs one, and how 20 was chosen: docs/ARCHITECTURE.md section 9.1.
DEFAULT_ABKD_WARMUP = 20


@METHODS.register("ce")
def _ce_preset(alpha: float, beta: float) -> dict[str, float]:
    return {"ce": 1.0}


@METHODS.register("kd")
def _kd_preset(alpha: float, beta: float) -> dict[str, float]:
    return {"ce": 1.0 - alpha, "kd": alpha}


def _aux_preset(term: str) -> Preset:
    def preset(alpha: float, beta: float) -> dict[str, float]:
        return {"ce": 1.0 - alpha, "kd": alpha, term: beta}

    return preset


for _term in ("fitnet", "at", "lsp", "gcrd", "abkd"):
    METHODS.register(_term)(_aux_preset(_term))


def term_options(name: str) -> list[str]:
    """Names of the keyword options accepted by loss term ``name`` (sorted)."""
    params = inspect.signature(LOSSES.get(name).__init__).parameters.values()
    return sorted(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)


def _route_options(names: list[str], options: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Splits flat options among the terms that accept them.

    ``options[name]`` given as a mapping for a term ``name`` of the objective goes to that
    term only; any other option goes to every term that declares it.

    Raises:
        ConfigError: Some option is accepted by none of the terms.
    """
    routed: dict[str, dict[str, Any]] = {n: {} for n in names}
    accepted = {n: set(term_options(n)) for n in names}
    unused = []
    for key, value in options.items():
        if key in routed and isinstance(value, Mapping):
            routed[key].update(value)
            continue
        targets = [n for n in names if key in accepted[n]]
        if not targets:
            unused.append(key)
        for n in targets:
            routed[n][key] = value
    if unused:
        raise ConfigError(
            f"unknown option(s) {', '.join(sorted(unused))} for loss terms {', '.join(names)}"
        )
    return routed


class Objective(nn.Module):
    """Weighted sum of loss terms with optional normalisation and warm-up of the auxiliaries.

    Args:
        weights: ``{term name: weight >= 0}``; names from :data:`LOSSES`.
        dims: Layer widths of teacher and student.
        normalize: Fix, at the first call in training mode, a scale per auxiliary term so
            that ``scale * value`` equals the ``kd`` value (``ce`` when there is no ``kd``).
            A term whose value or reference is ~0 is calibrated at a later call. Default:
            on when ``abkd`` is among the terms.
        warmup_epochs: Auxiliary weights grow linearly from 0 (epoch 0) to their full value
            (epoch ``warmup_epochs``); see :meth:`set_epoch`. 0: no warm-up. None (default):
            :data:`DEFAULT_ABKD_WARMUP` when ``abkd`` is among the terms, else 0.
        **options: Term options, routed to the terms that accept them (``tau`` -> ``kd``,
            ``kd_nodes`` -> ``abkd``, ``pairs`` -> all of fitnet/at/lsp/gcrd present, ...);
            ``<term>={...}`` sends a dict to one term only.

    Raises:
        ConfigError: Unknown term, bad weight, or an option no term accepts.
    """

    def __init__(
        self,
        weights: Mapping[str, float],
        dims: LayerDims,
        *,
        normalize: bool | None = None,
        warmup_epochs: int | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        if not weights:
            raise ConfigError("an objective needs at least one loss term")
        names = [str(n).lower() for n in weights]
        classes = {n: LOSSES.get(n) for n in names}
        self.weights: dict[str, float] = {}
        for name, w in zip(names, weights.values(), strict=True):
            value = float(w)
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"weight of loss {name!r} must be finite and >= 0, got {w!r}")
            self.weights[name] = value
        routed = _route_options(names, options)
        self.terms = nn.ModuleDict({n: classes[n](dims, **routed[n]) for n in names})
        self.normalize = ("abkd" in names) if normalize is None else bool(normalize)
        self.reference = "kd" if "kd" in names else ("ce" if "ce" in names else None)
        if self.normalize and self.reference is None and self.aux_names():
            raise ConfigError("normalize needs a 'kd' (or 'ce') term to match the scale of")
        if warmup_epochs is None:
            warmup_epochs = DEFAULT_ABKD_WARMUP if "abkd" in names else 0
        if int(warmup_epochs) < 0:
            raise ConfigError(f"warmup_epochs must be >= 0, got {warmup_epochs!r}")
        self.warmup_epochs = int(warmup_epochs)
        self.epoch = 0
        self.register_buffer("scales", torch.ones(len(names)))
        self.register_buffer("calibrated", torch.zeros(len(names), dtype=torch.bool))

    @classmethod
    def from_method(
        cls,
        method: str,
        dims: LayerDims,
        *,
        alpha: float = 0.7,
        tau: float = 4.0,
        beta: float = 1.0,
        normalize: bool | None = None,
        warmup_epochs: int | None = None,
        **term_options: Any,
    ) -> Objective:
        """The preset of a KD method: ``ce``, ``kd``, ``fitnet``, ``at``, ``lsp``, ``gcrd``,
        ``abkd`` (weights ``1-alpha`` for ce, ``alpha`` for kd, ``beta`` for the method's own
        term).

        Args:
            method: Name in :data:`METHODS`.
            dims: Layer widths.
            alpha: Weight of the ``kd`` term, in ``[0, 1]`` (default 0.7).
            tau: KD temperature (default 4).
            beta: Weight of the method's auxiliary term, >= 0 (default 1).
            normalize: See :class:`Objective` (default: on for ``abkd`` only).
            warmup_epochs: See :class:`Objective`.
            **term_options: Options of the method's terms.

        Raises:
            ConfigError: Unknown method, ``alpha`` outside ``[0, 1]``, negative ``beta``,
                or unknown options.
        """
        preset = METHODS.get(method)
        alpha, beta = float(alpha), float(beta)
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"alpha must be in [0, 1], got {alpha}")
        if not (math.isfinite(beta) and beta >= 0.0):
            raise ConfigError(f"beta must be finite and >= 0, got {beta}")
        weights = preset(alpha, beta)
        if "kd" in weights:
            term_options = {"tau": tau, **term_options}
        return cls(weights, dims, normalize=normalize, warmup_epochs=warmup_epochs, **term_options)

    @classmethod
    def from_weights(
        cls, weights: Mapping[str, float], dims: LayerDims, **options: Any
    ) -> Objective:
        """A custom combination, e.g. ``{"ce": 0.3, "kd": 0.7, "lsp": 1.0}``; see the class."""
        return cls(weights, dims, **options)

    def aux_names(self) -> list[str]:
        """Names of the auxiliary terms (all but ``ce`` and ``kd``)."""
        return [n for n in self.weights if n not in BASE_TERMS]

    def set_epoch(self, epoch: int) -> None:
        """Sets the epoch (0-based) that drives the warm-up of the auxiliary weights."""
        self.epoch = int(epoch)

    def ramp(self) -> float:
        """Current warm-up factor of the auxiliary weights, in ``[0, 1]``."""
        if self.warmup_epochs <= 0:
            return 1.0
        return min(1.0, max(0.0, self.epoch / self.warmup_epochs))

    def scale_values(self) -> dict[str, float]:
        """Normalisation scale per term (1 for ``ce``/``kd`` and before calibration)."""
        return dict(zip(self.weights, self.scales.tolist(), strict=True))

    def effective_weights(self) -> dict[str, float]:
        """``weight * ramp * scale`` per term: what multiplies the raw value in the total."""
        ramp = self.ramp()
        return {
            n: w * s * (1.0 if n in BASE_TERMS else ramp)
            for (n, w), s in zip(self.weights.items(), self.scales.tolist(), strict=True)
        }

    def holdout_fraction(self) -> float:
        """Fraction of the labelled nodes a term wants held out of the student's
        cross-entropy (``abkd``'s ``holdout``; 0 when none does)."""
        return max((float(getattr(t, "holdout", 0.0)) for t in self.terms.values()), default=0.0)

    def attention(self) -> Tensor | None:
        """The ``[L_S, L_T]`` ABKD attention of the last call, or None without an abkd term."""
        return self.terms["abkd"].attention() if "abkd" in self.terms else None

    @torch.no_grad()
    def _calibrate(self, raw: list[Tensor]) -> None:
        names = list(self.weights)
        ref = raw[names.index(self.reference)].detach().abs().float()
        if not (torch.isfinite(ref) and ref > _EPS):
            return
        for k, name in enumerate(names):
            if name in BASE_TERMS or bool(self.calibrated[k]):
                continue
            value = raw[k].detach().abs().float()
            if torch.isfinite(value) and value > _EPS:
                self.scales[k] = ref / value
                self.calibrated[k] = True

    def forward(self, batch: KDBatch) -> tuple[Tensor, dict[str, float]]:
        """Evaluates every term on ``batch``.

        Returns:
            ``(total, values)``: the scalar weighted total (differentiable) and the raw,
            unweighted value of each term as a float.
        """
        raw = [term(batch) for term in self.terms.values()]
        if self.normalize and self.training and self.aux_names():
            self._calibrate(raw)
        coeffs = self.effective_weights()
        total = torch.zeros((), device=raw[0].device, dtype=raw[0].dtype)
        for name, value in zip(self.weights, raw, strict=True):
            if coeffs[name] != 0.0:  # a zero weight also drops a non-finite value
                total = total + coeffs[name] * value
        values = torch.stack([r.detach().float() for r in raw]).tolist()
        return total, dict(zip(self.weights, values, strict=True))

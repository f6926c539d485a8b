"""Shared types of the distillation loss terms: the batch, the layer widths, the base class.

Every term is an :class:`torch.nn.Module` registered in :data:`LOSSES` under a short name
(``ce``, ``kd``, ``fitnet``, ``at``, ``lsp``, ``gcrd``, ``abkd``). A term is built from the
layer widths of teacher and student plus keyword options, and maps a :class:`KDBatch` to a
scalar. Terms may own trainable parameters (regressors, projection heads, attention); these
exist only during distillation and never become part of the exported student.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from torch import Tensor, nn

from abkd_deploy.errors import ConfigError
from abkd_deploy.registry import Registry


@dataclass
class KDBatch:
    """What the trainer hands to every loss term for one step.

    Attributes:
        student_logits: ``[n, C]`` student outputs.
        student_hiddens: One ``[n, d_S^j]`` tensor per student layer ``j`` (the last may be
            the logits).
        teacher_logits: ``[n, C]`` teacher outputs (detached when the teacher is frozen).
        teacher_hiddens: One ``[n, d_T^i]`` tensor per teacher layer ``i``.
        y: ``[n]`` int64 labels.
        train_mask: ``[n]`` bool, rows whose label may be used (cross-entropy only).
        edge_index: ``[2, E]`` int64 edges ``src -> dst`` among the ``n`` rows (local ids);
            needed by ``lsp`` only.
        holdout_mask: ``[n]`` bool, labelled rows held out of ``train_mask`` (the student's
            cross-entropy never sees their labels); set only when the objective asks for a
            held-out split (``abkd``'s ``holdout``), whose attention is trained on them.
    """

    student_logits: Tensor
    student_hiddens: list[Tensor]
    teacher_logits: Tensor
    teacher_hiddens: list[Tensor]
    y: Tensor
    train_mask: Tensor
    edge_index: Tensor | None = None
    holdout_mask: Tensor | None = None

    @property
    def num_nodes(self) -> int:
        """Number of rows ``n`` in the batch."""
        return int(self.student_logits.shape[0])


@dataclass
class LayerDims:
    """Per-layer widths of teacher and student, fixed when the loss terms are built.

    Attributes:
        teacher: ``d_T^i`` for each teacher layer ``i`` (same order as ``teacher_hiddens``).
        student: ``d_S^j`` for each student layer ``j`` (same order as ``student_hiddens``).
        num_classes: ``C``, the width of the logits.
    """

    teacher: list[int]
    student: list[int]
    num_classes: int

    def __post_init__(self) -> None:
        self.teacher = [int(d) for d in self.teacher]
        self.student = [int(d) for d in self.student]
        self.num_classes = int(self.num_classes)
        if not self.teacher or not self.student:
            raise ConfigError("LayerDims needs at least one teacher and one student layer")
        if min(self.teacher + self.student) < 1 or self.num_classes < 1:
            raise ConfigError(f"layer widths must be positive, got {self}")


class LossTerm(nn.Module):
    """One named loss term; may own trainable parameters.

    Subclasses declare their options as keyword-only arguments and pass whatever is left
    to ``super().__init__(dims, **unknown)``, which rejects it.

    Args:
        dims: Layer widths of teacher and student.
        **options: Options this class does not know; any given raise :class:`ConfigError`.

    Raises:
        ConfigError: An unknown option was given.
    """

    #: Registry name, set by :func:`register_loss`.
    name: ClassVar[str] = "?"

    def __init__(self, dims: LayerDims, **options: Any) -> None:
        super().__init__()
        if options:
            raise ConfigError(
                f"unknown option(s) for loss {self.name!r}: {', '.join(sorted(options))}"
            )
        self.dims = dims

    def forward(self, batch: KDBatch) -> Tensor:  # pragma: no cover - abstract
        """Returns the scalar loss of ``batch``."""
        raise NotImplementedError

    def check_hiddens(self, batch: KDBatch) -> None:
        """Checks that the batch's hidden tensors have the widths given at construction.

        Raises:
            ValueError: Layer count or width differ from :attr:`dims`.
        """
        for side, hiddens, widths in (
            ("student", batch.student_hiddens, self.dims.student),
            ("teacher", batch.teacher_hiddens, self.dims.teacher),
        ):
            got = [int(h.shape[-1]) for h in hiddens]
            if got != widths:
                raise ValueError(f"loss {self.name!r}: {side} hidden widths {got} != {widths}")


LOSSES: Registry[type[LossTerm]] = Registry("loss")

L = TypeVar("L", bound=type[LossTerm])


def register_loss(name: str) -> Callable[[L], L]:
    """Class decorator: registers a :class:`LossTerm` in :data:`LOSSES` and sets its name."""

    def deco(cls: L) -> L:
        cls.name = name
        LOSSES.register(name)(cls)
        return cls

    return deco


def proportional_layer(j: int, num_student: int, num_teacher: int) -> int:
    """Teacher layer placed at the same relative depth as student layer ``j`` (0-based).

    Student layer ``j`` covers the fraction ``(j + 1) / L_S`` of the student's depth; the
    teacher layer ending at the same fraction is ``round((j + 1) * L_T / L_S) - 1``, so the
    last student layer always maps to the last teacher layer.
    """
    i = round((j + 1) * num_teacher / num_student) - 1
    return min(max(i, 0), num_teacher - 1)

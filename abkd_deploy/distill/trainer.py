"""Training loop shared by teacher training and distillation.

Homogeneous and typed graphs alike (:class:`~abkd_deploy.distill.graphs.GraphView`: rows
are the target nodes). Full batch for graphs that fit, or fixed-fanout mini-batches (KD
terms on the sampled target nodes); early stopping on the validation score; AMP (bfloat16
autocast) on CUDA; deterministic for a given seed on CPU. A frozen teacher's outputs are
computed once and cached (no repeated teacher forward passes).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch_geometric.data import Data

from abkd_deploy.devices import resolve_device
from abkd_deploy.distill.evaluate import full_graph_outputs, split_scores
from abkd_deploy.distill.graphs import GraphView
from abkd_deploy.errors import ConfigError
from abkd_deploy.models.base import GNN
from abkd_deploy.progress import Progress
from abkd_deploy.seeding import seed_everything


@dataclass
class TrainConfig:
    """Optimisation settings (see ``abkd-deploy teacher --help``)."""

    epochs: int = 300
    patience: int = 100
    lr: float = 0.01
    weight_decay: float = 5e-4
    batch_size: int = 0
    fanouts: tuple[int, ...] = (10, 10)
    device: str = "auto"
    seed: int = 0
    amp: bool = True
    progress: bool = True
    teacher_lr: float = 1e-3
    #: Weight decay of the distillation-only parameters (regressors, attention); None:
    #: ``weight_decay``.
    objective_weight_decay: float | None = None

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.patience < 1:
            raise ConfigError(f"epochs={self.epochs} and patience={self.patience} must be >= 1")
        if self.batch_size < 0:
            raise ConfigError(f"batch_size={self.batch_size}; expected >= 0 (0 = full batch)")


@dataclass
class FitResult:
    """Outcome of :meth:`Trainer.fit` (scores at the best validation epoch)."""

    best_epoch: int
    scores: dict[str, float]
    history: list[dict[str, float]]
    seconds_per_epoch: float
    extra: dict[str, Any] = field(default_factory=dict)


class Trainer:
    """Trains ``model`` on ``data``, optionally distilling from ``teacher``.

    Args:
        model: The model to train (the student, or the teacher when training one).
        data: Dataset following :func:`abkd_deploy.data.load_dataset`'s contract
            (homogeneous ``Data`` or ``TypedGraph``; the models must match it).
        cfg: Optimisation settings.
        objective: A :class:`abkd_deploy.distill.objective.Objective`; ``None`` = CE only.
        teacher: Teacher model for distillation.
        teacher_mode: ``frozen`` (default; outputs cached) or ``joint`` (fine-tuned with
            its own CE loss plus the objective's feature terms, at ``cfg.teacher_lr``).
        desc: Progress-bar label.
    """

    def __init__(
        self,
        model: GNN,
        data: Data,
        cfg: TrainConfig,
        objective=None,
        teacher: GNN | None = None,
        teacher_mode: str = "frozen",
        desc: str = "train",
    ) -> None:
        if teacher_mode not in ("frozen", "joint"):
            raise ConfigError(f"teacher_mode={teacher_mode!r}; expected frozen or joint")
        if objective is not None and teacher is None:
            raise ConfigError("distillation needs a teacher")
        if teacher_mode == "joint" and cfg.batch_size:
            raise ConfigError("--teacher-mode joint needs full-batch training (--batch-size 0)")
        self.cfg, self.data, self.desc = cfg, data, desc
        self.device = resolve_device(cfg.device)
        self.model, self.teacher = model, teacher
        self.objective, self.joint = objective, teacher_mode == "joint"
        self.amp = cfg.amp and self.device.type == "cuda"
        self.view = GraphView(data, self.device)
        for role, m in (("model", model), ("teacher", teacher)):
            if m is not None and bool(getattr(m, "typed", False)) != self.view.typed:
                kind = "a typed" if self.view.typed else "a homogeneous"
                raise ConfigError(f"{role} {m.arch!r} cannot train on {kind} graph")
        lsp = objective is not None and "lsp" in getattr(objective, "terms", {})
        if lsp and not self.view.has_target_edges():
            raise ConfigError(
                f"lsp needs edges between {data.target} nodes, but no relation of "
                f"{data.name or 'this graph'} joins {data.target} to {data.target}"
            )
        self.y = data.y.to(self.device)
        self.train_mask, self.holdout_mask = holdout_masks(data.train_mask, objective, cfg.seed)
        self.train_mask = self.train_mask.to(self.device)
        if self.holdout_mask is not None:
            self.holdout_mask = self.holdout_mask.to(self.device)

    def outputs(self, model: GNN) -> tuple[Tensor, list[Tensor]]:
        """Whole-graph ``(logits, hiddens)`` of ``model`` on the target rows (its mode as is)."""
        return model(*self.view.full(model))

    def fit(self) -> FitResult:
        """Trains with early stopping; leaves the best weights loaded in the model(s)."""
        seed_everything(self.cfg.seed)
        model = self.model.to(self.device)
        params = [{"params": model.parameters(), "lr": self.cfg.lr}]
        if self.objective is not None:
            self.objective.to(self.device)
            owd = self.cfg.objective_weight_decay
            params.append(
                {
                    "params": self.objective.parameters(),
                    "lr": self.cfg.lr,
                    "weight_decay": self.cfg.weight_decay if owd is None else owd,
                }
            )
        if self.teacher is not None:
            self.teacher.to(self.device)
            self.teacher.requires_grad_(self.joint)
            if self.joint:
                params.append({"params": self.teacher.parameters(), "lr": self.cfg.teacher_lr})
        optim = torch.optim.Adam(params, weight_decay=self.cfg.weight_decay)
        cache = None if (self.teacher is None or self.joint) else self._teacher_outputs()
        sampler = None
        if self.cfg.batch_size:
            fanouts = fit_fanouts(self.cfg.fanouts, model.num_layers)
            sampler = self.view.sampler(fanouts, model.norm, seed=self.cfg.seed)

        best = (-float("inf"), 0, None, None)
        history: list[dict[str, float]] = []
        train_seconds = 0.0
        bar = Progress(self.cfg.epochs, self.desc, enabled=self.cfg.progress, unit="epoch")
        for epoch in range(1, self.cfg.epochs + 1):
            if self.objective is not None and hasattr(self.objective, "set_epoch"):
                self.objective.set_epoch(epoch - 1)
            start = time.perf_counter()
            if sampler is None:
                terms = self._full_batch_step(optim, cache)
            else:
                sampler.resample(epoch)
                terms = self._mini_batch_epoch(optim, cache, sampler, epoch)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            train_seconds += time.perf_counter() - start
            scores = split_scores(self.data, full_graph_outputs(model, *self.view.full(model))[0])
            history.append({"epoch": epoch, **{f"loss/{k}": v for k, v in terms.items()}, **scores})
            bar.update({**terms, "val": scores["val"]})
            if scores["val"] > best[0]:
                teacher_state = copy.deepcopy(self.teacher.state_dict()) if self.joint else None
                best = (scores["val"], epoch, copy.deepcopy(model.state_dict()), teacher_state)
            elif epoch - best[1] >= self.cfg.patience:
                break
        bar.close(
            f"{len(history)} epochs, best epoch {best[1]}: val {history[best[1] - 1]['val']:.4f}, "
            f"test {history[best[1] - 1]['test']:.4f}"
        )
        model.load_state_dict(best[2])
        if best[3] is not None:
            self.teacher.load_state_dict(best[3])
        final = history[best[1] - 1]
        return FitResult(
            best_epoch=best[1],
            scores={k: final[k] for k in ("train", "val", "test")},
            history=history,
            seconds_per_epoch=train_seconds / len(history),
        )

    # ----------------------------------------------------------------- internals
    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp)

    @torch.no_grad()
    def _teacher_outputs(self) -> tuple[Tensor, list[Tensor]]:
        logits, hiddens = full_graph_outputs(self.teacher, *self.view.full(self.teacher))
        return logits.float(), [h.float() for h in hiddens]

    def _full_batch_step(self, optim, cache) -> dict[str, float]:
        self.model.train()
        optim.zero_grad(set_to_none=True)
        with self._autocast():
            logits, hiddens = self.outputs(self.model)
            if self.objective is None:
                loss = F.cross_entropy(logits[self.train_mask].float(), self.y[self.train_mask])
                terms = {"ce": loss.item()}
            else:
                if self.joint:
                    self.teacher.train()
                    t_logits, t_hiddens = self.outputs(self.teacher)
                else:
                    t_logits, t_hiddens = cache
                loss, terms = self._kd_loss(
                    logits,
                    hiddens,
                    t_logits,
                    t_hiddens,
                    self.y,
                    self.train_mask,
                    self.view.target_edges(),
                    self.holdout_mask,
                )
                if self.joint:
                    t_ce = F.cross_entropy(
                        t_logits[self.train_mask].float(), self.y[self.train_mask]
                    )
                    loss = loss + t_ce
                    terms["teacher_ce"] = float(t_ce)
        loss.backward()
        optim.step()
        return terms

    def _mini_batch_epoch(self, optim, cache, sampler, epoch: int) -> dict[str, float]:
        self.model.train()
        nodes = torch.arange(self.view.num_targets)
        if self.objective is None:  # plain training only needs labelled targets
            nodes = nodes[self.data.train_mask]
        gen = torch.Generator().manual_seed(self.cfg.seed * 100_003 + epoch)
        totals: dict[str, float] = {}
        steps = 0
        for batch in sampler.batches(nodes, self.cfg.batch_size, generator=gen):
            inputs, blocks, targets, edges = self.view.batch(batch, self.model)
            optim.zero_grad(set_to_none=True)
            with self._autocast():
                logits, hiddens = self.model(inputs, blocks)
                hiddens = [h[: batch.batch_size] for h in hiddens]
                y, mask = self.y[targets], self.train_mask[targets]
                if self.objective is None:
                    loss = F.cross_entropy(logits.float(), y)
                    terms = {"ce": loss.item()}
                else:
                    t_logits, t_hiddens = cache
                    held = None if self.holdout_mask is None else self.holdout_mask[targets]
                    loss, terms = self._kd_loss(
                        logits,
                        hiddens,
                        t_logits[targets],
                        [h[targets] for h in t_hiddens],
                        y,
                        mask,
                        edges,
                        held,
                    )
            loss.backward()
            optim.step()
            steps += 1
            for k, v in terms.items():
                totals[k] = totals.get(k, 0.0) + v
        return {k: v / max(steps, 1) for k, v in totals.items()}

    def _kd_loss(self, logits, hiddens, t_logits, t_hiddens, y, mask, edge_index, held=None):
        from abkd_deploy.distill.losses import KDBatch

        batch = KDBatch(
            student_logits=logits.float(),
            student_hiddens=[h.float() for h in hiddens],
            teacher_logits=t_logits.float().detach(),
            teacher_hiddens=[h.float() for h in t_hiddens],
            y=y,
            train_mask=mask,
            edge_index=edge_index,
            holdout_mask=held,
        )
        return self.objective(batch)


def holdout_masks(train_mask: Tensor, objective, seed: int) -> tuple[Tensor, Tensor | None]:
    """``(labelled rows for the student's CE, held-out rows or None)``: the held-out split
    an objective asks for (:meth:`Objective.holdout_fraction`), seeded by the run's seed."""
    fraction = objective.holdout_fraction() if hasattr(objective, "holdout_fraction") else 0.0
    if fraction <= 0:
        return train_mask, None
    from abkd_deploy.distill.losses.abkd_attention import holdout_split

    return holdout_split(train_mask, fraction, seed)


def fit_fanouts(fanouts: tuple[int, ...], num_layers: int) -> list[int]:
    """Uses the given per-layer fanouts, repeating the last one for deeper models."""
    if not fanouts or any(int(k) < 1 for k in fanouts):
        raise ConfigError(f"fanouts={fanouts}; expected positive integers")
    fan = [int(k) for k in fanouts][:num_layers]
    return fan + [fan[-1]] * (num_layers - len(fan))

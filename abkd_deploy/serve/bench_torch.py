"""PyTorch side of the bench (teacher and eager student); imported only by its workers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from abkd_deploy.data import load_dataset
from abkd_deploy.data.graph import FullGraph
from abkd_deploy.data.typed_blocks import TypedBlock
from abkd_deploy.data.typed_graph import is_typed
from abkd_deploy.devices import resolve_device
from abkd_deploy.models import load_model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_torch(spec: dict[str, Any]):
    """(predict, logits, info) for ``teacher-torch`` or ``student-torch`` (see bench_worker)."""
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    device = resolve_device(spec["device"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    builders = {
        "teacher-torch": _teacher,
        "student-torch": _student_sampled,
        "student-torch-export": _student_export,
    }
    module, info = builders[spec["model"]](spec, device)

    @torch.inference_mode()
    def logits(ids: np.ndarray) -> np.ndarray:
        out = module(torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64)).to(device))
        _sync(device)
        return out.float().cpu().numpy()

    gpu = (
        (lambda: torch.cuda.max_memory_allocated(device) / 2**20) if device.type == "cuda" else None
    )
    return logits, logits, {**info, "gpu_peak_mb": gpu}


def _teacher(spec: dict[str, Any], device: torch.device):
    teacher, meta = load_model(spec["teacher_dir"], "teacher")
    ds = meta.get("dataset") or spec["dataset"]
    data = load_dataset(ds["name"], ds.get("root"), ds.get("split"))
    teacher = teacher.to(device).eval()
    if is_typed(data):  # target-type ids; one sparse operand per relation
        graph = TypedBlock.full_graph(data, teacher.norm).to(device)
        x = teacher.inputs(data, device=device)
    else:
        graph = FullGraph.from_edge_index(data.edge_index, data.num_nodes, teacher.norm)
        graph, x = graph.to(device), data.x.to(device)

    def answer(ids: torch.Tensor) -> torch.Tensor:  # full-graph forward per request
        return teacher(x, graph)[0].index_select(0, ids)

    size = (Path(spec["teacher_dir"]) / "teacher.safetensors").stat().st_size
    return answer, {
        "served_as": "PyTorch eager, full graph per request "
        f"({teacher.arch}, {teacher.num_layers} layers)",
        "model_bytes": size,
        "params": sum(p.numel() for p in teacher.parameters()),
    }


def _student_sampled(spec: dict[str, Any], device: torch.device):
    """The trained student as a PyTorch user serves it: per request, gather the
    fixed-fanout blocks (the export's tables, de-duplicated) and run the model."""
    from abkd_deploy.data.csr import CSR
    from abkd_deploy.data.sampler import NeighborSampler
    from abkd_deploy.export.reference import load_run_dataset
    from abkd_deploy.serve.manifest import load_manifest

    adj = load_manifest(spec["export_dir"])["adjacency"]
    student, meta = load_model(spec["run_dir"], "student")
    data = load_run_dataset(Path(spec["run_dir"]), meta, student)
    if is_typed(data):
        return _typed_student_sampled(adj, student, data, device, spec)
    csr = CSR.from_edge_index(data.edge_index, data.num_nodes)
    sampler = NeighborSampler(
        csr, adj["fanouts"], student.norm, seed=int(adj.get("sampling_seed") or 0)
    )
    x = data.x.to(device)
    student = student.to(device).eval()

    def answer(ids: torch.Tensor) -> torch.Tensor:
        batch = sampler.sample(ids.cpu())
        blocks = [b.to(device) for b in batch.blocks]
        return student(x.index_select(0, batch.n_id.to(device)), blocks)[0]

    size = (Path(spec["run_dir"]) / "student.safetensors").stat().st_size
    return answer, {
        "served_as": "PyTorch eager: trained student on sampled blocks "
        f"(fanouts {adj['fanouts']}, same tables as the export)",
        "model_bytes": size,
    }


def _typed_student_sampled(adj: dict[str, Any], student, data, device: torch.device, spec):
    """``student-torch`` of a typed export: the student on typed blocks sampled from the
    export's per-relation tables (unique targets per request, answers in request order)."""
    from abkd_deploy.export.adjacency import ADJACENCY
    from abkd_deploy.export.typed_context import typed_export_context

    seed = int(adj.get("sampling_seed") or 0)
    ctx = typed_export_context(
        ADJACENCY.get(adj["format"]), student, data, adj["fanouts"], seed, torch.zeros(0)
    )
    student = student.to(device).eval()

    def answer(ids: torch.Tensor) -> torch.Tensor:
        unique, inverse = torch.unique(ids.cpu(), return_inverse=True)
        batch = ctx.sampler.sample(unique).to(device)
        out = student(student.inputs(data, batch.n_id, device), batch.blocks)[0]
        return out.index_select(0, inverse.to(device))

    size = (Path(spec["run_dir"]) / "student.safetensors").stat().st_size
    return answer, {
        "served_as": "PyTorch eager: trained typed student on sampled blocks "
        f"(fanouts {adj['fanouts']}, same tables as the export)",
        "model_bytes": size,
    }


def _student_export(spec: dict[str, Any], device: torch.device):
    from abkd_deploy.export.rebuild import build_export_module

    module = build_export_module(spec["export_dir"])
    module = module.to(device).eval()

    def answer(ids: torch.Tensor) -> torch.Tensor:
        return module(ids)[0]

    size = sum(b.numel() * b.element_size() for b in module.buffers()) + sum(
        p.numel() * p.element_size() for p in module.parameters()
    )
    return answer, {
        "served_as": "PyTorch eager: the export-form module (same graph as the ONNX model)",
        "model_bytes": size,
    }

"""Validation refuses artifacts that disagree with PyTorch and leaves nothing on disk.

It checks the output names an artifact declares, the number of outputs, their shapes, then
their values, each with its own :class:`ValidationError` subclass.
"""

import re

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from abkd_deploy.errors import (
    ExportError,
    OutputCountMismatch,
    OutputNamesMismatch,
    OutputShapeMismatch,
    ValidationError,
    ValuesMismatch,
)
from abkd_deploy.export import api, export, onnx_format
from abkd_deploy.export.adjacency import module_runner
from abkd_deploy.export.validate import validate_artifact


@pytest.fixture
def corrupt_before_validation(monkeypatch):
    """After the artifact is written (traced) and before it is validated, change one weight
    of the PyTorch model so that the two disagree."""
    real = api.validate_artifact

    def wrapper(name, runner, reference, *args, **kwargs):
        with torch.no_grad():
            weight = next(p for p in reference.student.parameters() if p.dim() == 2)
            weight[0, 0] += 0.5
        return real(name, runner, reference, *args, **kwargs)

    monkeypatch.setattr(api, "validate_artifact", wrapper)


@pytest.mark.parametrize(("adjacency", "fmt"), [("embedded", "onnx"), ("ell", "torchscript")])
def test_corrupted_model_is_refused_and_nothing_is_written(
    gcn_run, tmp_path, capsys, corrupt_before_validation, adjacency, fmt
):
    out = tmp_path / "exports" / "model"
    with pytest.raises(ValuesMismatch, match=r"max abs diff .* exceeds atol 0.0001"):
        export(gcn_run, out, formats=(fmt,), adjacency=adjacency)
    assert "max abs diff vs PyTorch" in capsys.readouterr().err  # printed either way
    assert list((tmp_path / "exports").iterdir()) == []  # no out dir, no temp dir


def test_failing_exporter_leaves_nothing(gcn_run, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("exporter exploded\nsecond line")

    monkeypatch.setattr(torch.export, "export", broken)
    with pytest.raises(ExportError, match="torch.export failed: exporter exploded$"):
        export(gcn_run, tmp_path / "pt2", formats=("torchscript", "pt2"), progress=False)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------ output names, count, shapes, then values


class TwoOutputs(nn.Module):
    """A reference with the two outputs of an ``embedded`` export."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return 2 * x, x.sum(1, keepdim=True)


NAMES = ["logits", "embedding"]
INPUT_SETS = [
    ("batch of 3", (torch.arange(6.0).reshape(3, 2),)),
    ("batch of 1", (torch.ones(1, 2),)),
]
MISMATCHES = (OutputNamesMismatch, OutputCountMismatch, OutputShapeMismatch, ValuesMismatch)


def validate(mutate=lambda outs: outs, declared=None):
    """Validates an artifact whose outputs are the reference's passed through ``mutate``."""
    reference = TwoOutputs()
    runner = module_runner(reference)
    artifact = lambda inputs: mutate(runner(inputs))  # noqa: E731
    return validate_artifact(
        "onnx", artifact, reference, INPUT_SETS, NAMES, 1e-4, declared=declared
    )


@pytest.mark.parametrize(
    ("mutate", "declared", "error", "text"),
    [
        (lambda outs: outs, ["logits"], OutputNamesMismatch, "lacks 'embedding'"),
        (lambda outs: outs, [*NAMES, "hidden"], OutputNamesMismatch, "unexpected output 'hidden'"),
        (lambda outs: outs, NAMES[::-1], OutputNamesMismatch, "'logits' at position 2"),
        (lambda outs: outs, ["logits", "logits"], OutputNamesMismatch, "lacks 'embedding'"),
        (lambda outs: outs[:1], None, OutputCountMismatch, "'embedding' is missing"),
        (lambda outs: [*outs, outs[0]], None, OutputCountMismatch, "output 3 is not one of"),
        (lambda outs: [outs[0], outs[1].T], None, OutputShapeMismatch, "output 'embedding' has"),
        (lambda outs: [outs[0][:, :1], outs[1]], NAMES, OutputShapeMismatch, "'logits' has shape"),
        (lambda outs: [outs[0] + 1e-3, outs[1]], NAMES, ValuesMismatch, "on 'logits'"),
        (lambda outs: [outs[0], outs[1] * np.nan], None, ValuesMismatch, "inf on 'embedding'"),
    ],
)
def test_each_mismatch_has_its_own_error(mutate, declared, error, text):
    with pytest.raises(ValidationError) as info:
        validate(mutate, declared)
    assert type(info.value) is error
    assert [isinstance(info.value, cls) for cls in MISMATCHES].count(True) == 1
    message = str(info.value)
    assert text in message and "\n" not in message and message.endswith("nothing was written")


def test_a_shape_mismatch_is_not_reported_as_an_infinite_difference():
    with pytest.raises(OutputShapeMismatch, match=r"\(1, 3\) on input set 'batch of 3', run 1; "):
        validate(lambda outs: [outs[0], outs[1].T])


def test_a_matching_artifact_passes_with_declared_names():
    assert validate(declared=NAMES) == {"logits": 0.0, "embedding": 0.0}


@pytest.fixture
def mutate_artifact(monkeypatch):
    """Makes the loaded artifact return ``mutate(its real outputs)`` during validation."""

    def install(mutate):
        real = api.validate_artifact

        def wrapper(name, runner, reference, *args, **kwargs):
            return real(name, lambda inputs: mutate(runner(inputs)), reference, *args, **kwargs)

        monkeypatch.setattr(api, "validate_artifact", wrapper)

    return install


@pytest.mark.parametrize(
    ("mutate", "error", "text"),
    [
        (lambda outs: outs[:1], OutputCountMismatch, "'embedding' is missing"),
        (lambda outs: [*outs, outs[1]], OutputCountMismatch, "expected 2 (logits, embedding)"),
        (lambda outs: [outs[0][:, :-1], outs[1]], OutputShapeMismatch, "output 'logits' has"),
        (lambda outs: [outs[0], outs[1] + 1e-3], ValuesMismatch, "on 'embedding'"),
    ],
)
def test_torchscript_artifact_mismatches_leave_nothing(
    gcn_run, tmp_path, mutate_artifact, mutate, error, text
):
    mutate_artifact(mutate)
    with pytest.raises(error, match=re.escape(text)) as info:
        export(gcn_run, tmp_path / "exports" / "m", formats=("torchscript",), progress=False)
    assert "\n" not in str(info.value)
    assert list((tmp_path / "exports").iterdir()) == []


def _edit_outputs(path, edit) -> None:
    model = onnx.load(str(path), load_external_data=False)
    edit(model)
    onnx.save_model(model, str(path))


def _drop_embedding(model) -> None:
    keep = [o for o in model.graph.output if o.name != "embedding"]
    del model.graph.output[:]
    model.graph.output.extend(keep)


def _add_hidden(model) -> None:
    inferred = onnx.shape_inference.infer_shapes(model)
    hidden = next(v for v in inferred.graph.value_info if v.type.tensor_type.elem_type == 1)
    model.graph.output.append(hidden)


@pytest.mark.parametrize(
    ("edit", "text"), [(_drop_embedding, "lacks 'embedding'"), (_add_hidden, "unexpected output")]
)
def test_onnx_file_with_other_outputs_is_refused(gcn_run, tmp_path, monkeypatch, edit, text):
    """A real model.onnx whose declared outputs differ (edited after the exporter wrote it)."""
    real = onnx_format.check_onnx

    def check_then_edit(path):
        real(path)
        _edit_outputs(path, edit)

    monkeypatch.setattr(onnx_format, "check_onnx", check_then_edit)
    with pytest.raises(OutputNamesMismatch, match=re.escape(text)) as info:
        export(gcn_run, tmp_path / "exports" / "m", formats=("onnx",), progress=False)
    assert "\n" not in str(info.value)
    assert list((tmp_path / "exports").iterdir()) == []

"""Validation refuses artifacts that disagree with PyTorch and leaves nothing on disk."""

import pytest
import torch

from abkd_deploy.errors import ExportError, ValidationError
from abkd_deploy.export import api, export


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
    with pytest.raises(ValidationError, match=r"max abs diff .* exceeds atol 0.0001"):
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

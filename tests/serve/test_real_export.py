"""Predictor on real exports (exporter output, not hand-built graphs), incl. external data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from abkd_deploy.export import export, onnx_format
from abkd_deploy.export.rebuild import build_export_module
from abkd_deploy.serve import ArtifactError, Predictor
from tests.export.conftest import make_run


@pytest.fixture(scope="module")
def external_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sage student exported with every initializer in ``model.onnx.data``."""
    root = tmp_path_factory.mktemp("real")
    run = make_run(root / "run", "sage")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(onnx_format, "EXTERNAL_DATA_BYTES", 0)
        export(run, root / "export", progress=False)
    return root / "export"


def test_predictor_serves_external_data_export(external_export: Path) -> None:
    assert (external_export / "model.onnx.data").is_file()
    predictor = Predictor(external_export, device="cpu")
    ids = np.array([0, 3, 3, 599, 42])
    pred = predictor.predict(ids, return_embedding=True)
    with torch.no_grad():
        logits, emb = build_export_module(external_export)(torch.from_numpy(ids))
    assert np.array_equal(pred.classes, logits.argmax(1).numpy())
    assert np.allclose(pred.embedding, emb.numpy(), atol=1e-5)
    assert np.allclose(pred.scores.sum(1), 1.0, atol=1e-5)


def test_predictor_refuses_tampered_external_data(external_export: Path, tmp_path: Path) -> None:
    import shutil

    copy = Path(shutil.copytree(external_export, tmp_path / "copy"))
    data = bytearray((copy / "model.onnx.data").read_bytes())
    data[-1] ^= 0xFF  # one flipped byte in a weight
    (copy / "model.onnx.data").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="model.onnx.data"):
        Predictor(copy, device="cpu")

"""CUDA paths: provider selection and IO binding (skipped without a GPU and onnxruntime-gpu)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from abkd_deploy.errors import DeviceError
from abkd_deploy.serve import Predictor

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        "CUDAExecutionProvider" not in ort.get_available_providers(),
        reason="onnxruntime here has no CUDAExecutionProvider (install onnxruntime-gpu)",
    ),
]


def test_cuda_provider_and_io_binding(embedded_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gpu = Predictor(embedded_dir, device="cuda")
    assert gpu.provider == "CUDAExecutionProvider"
    assert gpu.session.get_providers()[0] == "CUDAExecutionProvider"

    def no_plain_run(*args, **kwargs):
        raise AssertionError("CUDA predictions must go through IO binding")

    monkeypatch.setattr(gpu.session, "run", no_plain_run)
    cpu = Predictor(embedded_dir, device="cpu")
    ids = np.arange(0, 500, 7)
    got, want = gpu.predict(ids, return_embedding=True), cpu.predict(ids, return_embedding=True)
    np.testing.assert_array_equal(got.classes, want.classes)
    np.testing.assert_allclose(got.scores, want.scores, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got.embedding, want.embedding, rtol=1e-4, atol=1e-5)


def test_auto_prefers_cuda(embedded_dir: Path) -> None:
    p = Predictor(embedded_dir, device="auto")
    assert p.provider == "CUDAExecutionProvider" and p.info()["device_note"] is None


def test_missing_device_is_an_error(embedded_dir: Path) -> None:
    with pytest.raises(DeviceError, match="cannot run on CUDA"):
        Predictor(embedded_dir, device="cuda:97")

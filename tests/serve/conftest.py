"""Fixtures: tiny export directories built with onnx.helper (no exporter, no torch)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.serve.tiny_export import TinyModel, make_tiny, write_embedded


@pytest.fixture(scope="session")
def tiny() -> TinyModel:
    """The weights behind :func:`embedded_dir`."""
    return make_tiny()


@pytest.fixture(scope="session")
def embedded_dir(tmp_path_factory: pytest.TempPathFactory, tiny: TinyModel) -> Path:
    """A read-only-by-convention ``embedded`` export directory (do not modify)."""
    return write_embedded(tmp_path_factory.mktemp("export") / "embedded", tiny)


@pytest.fixture
def export_copy(embedded_dir: Path, tmp_path: Path) -> Path:
    """A private copy of :func:`embedded_dir` that a test may corrupt."""
    return Path(shutil.copytree(embedded_dir, tmp_path / "export"))

"""The two float16 exports that ``export()`` refuses up front, with nothing written.

* a ``gat`` student in ``ell`` / ``embedded`` form: its attention mask fills padded slots
  with -1e9, which is not representable in float16;
* ``coo`` adjacency to ONNX: onnxruntime's CPU ScatterElements has no float16 ``add``.

Both are ConfigErrors (exit code 2 at the CLI), raised before the dataset is loaded.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from abkd_deploy.cli import main
from abkd_deploy.errors import ConfigError
from abkd_deploy.export import export

from .conftest import make_run

GAT_MESSAGE = r"gat students cannot be exported as float16 in ell/embedded form"
COO_MESSAGE = r"coo adjacency cannot be exported to onnx as float16"


@pytest.fixture(scope="module")
def gat_run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("gat_run"), "gat", epochs=2)


def assert_nothing_written(parent: Path) -> None:
    assert list(parent.iterdir()) == [], "a refused export left files behind"


@pytest.mark.parametrize("adjacency", ["ell", "embedded"])
@pytest.mark.parametrize("formats", [("onnx",), ("torchscript",), ("pt2", "onnx")])
def test_gat_float16_padded_forms_are_refused(gat_run, tmp_path, adjacency, formats) -> None:
    with pytest.raises(ConfigError, match=GAT_MESSAGE) as info:
        export(
            gat_run, tmp_path / "out", formats, adjacency=adjacency, dtype="float16", progress=False
        )
    assert "\n" not in str(info.value) and "--dtype float32" in str(info.value)
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize("run", ["gcn_run", "gat_run"])
@pytest.mark.parametrize("formats", [("onnx",), ("torchscript", "onnx")])
def test_coo_float16_onnx_is_refused(request, tmp_path, run, formats) -> None:
    run_dir = request.getfixturevalue(run)
    with pytest.raises(ConfigError, match=COO_MESSAGE) as info:
        export(run_dir, tmp_path / "out", formats, adjacency="coo", dtype="float16", progress=False)
    assert "\n" not in str(info.value) and "--adjacency ell" in str(info.value)
    assert_nothing_written(tmp_path)


def test_float16_refusals_are_narrow(gat_run, tmp_path) -> None:
    """A gat student in coo form as float16 is allowed when no ONNX file is asked for."""
    manifest = export(
        gat_run,
        tmp_path / "out",
        ("torchscript",),
        adjacency="coo",
        dtype="float16",
        progress=False,
    )
    assert manifest["dtype"] == "float16" and manifest["adjacency"]["format"] == "coo"
    assert (tmp_path / "out" / "model.pt").is_file()


@pytest.mark.parametrize(
    ("run", "extra", "text"),
    [
        ("gat_run", ["--adjacency", "ell"], GAT_MESSAGE),
        ("gat_run", [], GAT_MESSAGE),  # embedded is the default adjacency
        ("gcn_run", ["--adjacency", "coo"], COO_MESSAGE),
    ],
)
def test_cli_float16_refusals_exit_2(request, tmp_path, run, extra, text) -> None:
    out = tmp_path / "out"
    args = ["export", str(request.getfixturevalue(run)), "--out", str(out), "--dtype", "float16"]
    result = CliRunner().invoke(main, [*args, *extra])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and "Traceback" not in result.output
    assert text.replace("\\", "") in result.output
    assert_nothing_written(tmp_path)

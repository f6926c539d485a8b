"""The pipeline reads what formats declare (capabilities and hooks), never their names."""

from __future__ import annotations

import dataclasses

import pytest

from abkd_deploy.errors import ConfigError, ExportError
from abkd_deploy.export import export, onnx_format
from abkd_deploy.export.adjacency import ADJACENCY
from abkd_deploy.export.formats import get_format
from abkd_deploy.export.options import check_options, check_supported


def test_exact_graph_formats_always_use_the_max_degree():
    coo, ell, embedded = (ADJACENCY.get(n) for n in ("coo", "ell", "embedded"))
    assert coo.fanouts("3", 2, 17) == [17, 17] and coo.fanouts(None, 3, 0) == [1, 1, 1]
    assert ell.fanouts(None, 2, 9) == [9, 9] and ell.fanouts("3,4", 2, 9) == [3, 4]
    assert embedded.fanouts(None, 2, 9) == [10, 10]
    with pytest.raises(ConfigError, match="bad fanout 'ten'"):  # still checked for coo
        coo.fanouts("ten", 2, 17)


def test_float16_refusals_follow_capabilities_not_names():
    onnx, torchscript = get_format("onnx"), get_format("torchscript")
    scattering_ell = dataclasses.replace(ADJACENCY.get("ell"), gather_only=False)
    with pytest.raises(ConfigError, match="^ell adjacency cannot be exported to onnx as float16"):
        check_supported(scattering_ell, [torchscript, onnx], "float16", "gcn")
    check_supported(scattering_ell, [torchscript], "float16", "gcn")  # no onnx: accepted
    check_supported(ADJACENCY.get("coo"), [onnx], "float32", "gat")
    with pytest.raises(ConfigError, match="^gat students cannot be exported as float16"):
        check_supported(ADJACENCY.get("embedded"), [torchscript], "float16", "gat")


def test_min_opset_is_a_capability():
    strict = dataclasses.replace(ADJACENCY.get("ell"), min_opset=20, opset_reason="a new op")
    with pytest.raises(ConfigError, match=r"^ell adjacency needs opset >= 20 \(a new op\); got 19"):
        check_options(strict, 19, "float32", None)
    assert check_options(ADJACENCY.get("ell"), 18, "float16", None) == 1e-2


def test_onnx_check_refuses_scatter_in_a_gather_only_form(gcn_run, tmp_path):
    export(gcn_run, tmp_path / "coo", adjacency="coo", progress=False)
    path = tmp_path / "coo" / "model.onnx"
    onnx_format.check_written(path, ADJACENCY.get("coo"))  # coo may scatter
    gather_only = r"^model.onnx contains Scatter[\w, ]+; expected gather-only"
    with pytest.raises(ExportError, match=gather_only):
        onnx_format.check_written(path, ADJACENCY.get("ell"))
    assert onnx_format.output_names(path) == ["logits"]

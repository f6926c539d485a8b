"""``export RUN --dataset SPEC``: embed another snapshot of the graph than the training one."""

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from abkd_deploy.cli import main
from abkd_deploy.data import load_dataset
from abkd_deploy.data.graph import FullGraph
from abkd_deploy.errors import ConfigError
from abkd_deploy.export import export
from abkd_deploy.manifest import ManifestError, read_manifest
from abkd_deploy.models import load_model

from .conftest import DATASET

SNAPSHOT = "csbm:num_nodes=900,seed=1"


def test_export_embeds_the_snapshot_and_matches_pytorch_on_it(gcn_run, tmp_path):
    out = tmp_path / "snap"
    manifest = export(gcn_run, out, fanouts="max", dataset=SNAPSHOT, progress=False)
    snap = load_dataset(SNAPSHOT)
    assert manifest["graph"]["num_nodes"] == snap.num_nodes == 900
    assert manifest["graph"]["num_edges"] == snap.edge_index.size(1)
    prov = manifest["provenance"]
    assert prov["dataset"]["name"] == DATASET
    assert prov["snapshot"] == {
        "name": SNAPSHOT,
        "root": None,
        "split": None,
        "num_nodes": 900,
        "num_edges": int(snap.edge_index.size(1)),
    }
    assert manifest["accuracy"]["nodes"] == int(snap.test_mask.sum())

    student, _ = load_model(gcn_run, "student")
    student = student.float().eval()
    with torch.no_grad():
        want = student(snap.x, FullGraph.from_edge_index(snap.edge_index, 900, student.norm))[0]
    ids = np.array([0, 17, 599, 600, 850, 899], dtype=np.int64)  # ids past the old 600 too
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"node_ids": ids})[0]
    np.testing.assert_allclose(got, want[ids].numpy(), atol=1e-5, rtol=0)

    assert read_manifest(out)["provenance"]["snapshot"]["num_nodes"] == 900
    edited = {**manifest, "provenance": {**prov, "snapshot": {**prov["snapshot"], "num_nodes": 1}}}
    (out / "manifest.json").write_text(json.dumps(edited))
    with pytest.raises(ManifestError, match="provenance.snapshot"):
        read_manifest(out)


@pytest.mark.parametrize(
    ("spec", "text"),
    [
        ("csbm:num_nodes=900,seed=1,num_features=32", "32 features"),
        ("csbm:num_nodes=900,seed=1,num_classes=3", "3 classes"),
    ],
)
def test_incompatible_snapshot_is_refused_with_one_line(gcn_run, tmp_path, spec, text):
    out = tmp_path / "bad"
    with pytest.raises(ConfigError) as info:
        export(gcn_run, out, dataset=spec, progress=False)
    message = str(info.value)
    assert text in message and "\n" not in message
    assert ("64 features" if "features" in text else "5 classes") in message
    assert not out.exists()

    res = CliRunner().invoke(main, ["export", str(gcn_run), "--out", str(out), "--dataset", spec])
    assert res.exit_code == 2 and text in res.output, res.output
    assert "Traceback" not in res.output
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_snapshot_export_and_name_checks(gcn_run, tmp_path):
    runner = CliRunner()
    out = tmp_path / "snap"
    args = ["export", str(gcn_run), "--out", str(out), "--fanout", "max"]
    res = runner.invoke(main, [*args, "--dataset", SNAPSHOT])
    assert res.exit_code == 0, res.output
    assert f"of snapshot {SNAPSHOT!r}" in res.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["provenance"]["snapshot"]["num_nodes"] == 900

    other = str(tmp_path / "other")
    res = runner.invoke(main, ["export", str(gcn_run), "--out", other, "--dataset", "csbn"])
    assert res.exit_code == 2 and "unknown dataset 'csbn'" in res.output, res.output
    res = runner.invoke(main, ["export", str(gcn_run), "--out", other, "--split", "1"])
    assert res.exit_code == 2 and "--dataset" in res.output, res.output
    assert not (tmp_path / "other").exists()

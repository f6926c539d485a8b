"""``refresh``: a live export plus a delta equals a full export on the updated graph."""

from __future__ import annotations

import hashlib
import shutil

import numpy as np
import onnxruntime as ort
import pytest
import torch

from abkd_deploy.data import load_dataset
from abkd_deploy.data.delta import write_delta
from abkd_deploy.data.npz import save_npz
from abkd_deploy.errors import CheckpointError, ConfigError, DatasetError
from abkd_deploy.export import export
from abkd_deploy.export.refresh import refresh
from abkd_deploy.manifest import check_model, read_manifest, verify_files

from .conftest import DATASET, make_run

FANOUTS = "3,4"  # below the graph's max degree: sampled tables


def _delta(data, seed: int, new: int = 6, add: int = 40, remove: int = 20, update: int = 12):
    """A random delta: ``new`` nodes joined to random nodes, edges added and removed,
    features updated."""
    rng = np.random.default_rng(seed)
    n = data.num_nodes
    ei = data.edge_index.numpy()
    upper = ei[:, ei[0] < ei[1]]
    removed = upper[:, rng.choice(upper.shape[1], remove, replace=False)]
    src = rng.integers(0, n + new, add)
    dst = rng.integers(0, n, add)
    src[:new] = np.arange(n, n + new)  # every new node gets at least one edge ...
    src[-1], dst[-1] = n + new - 1, n + 1  # ... the last one two
    keep = src != dst
    ids = rng.choice(n, update, replace=False)
    return {
        "add_edges": np.stack([src[keep], dst[keep]]),
        "remove_edges": removed,
        "new_x": rng.normal(size=(new, data.num_features)).astype(np.float32),
        "update_ids": ids,
        "update_x": rng.normal(size=(update, data.num_features)).astype(np.float32),
    }


def _updated_graph(data, delta):
    """The updated graph built independently of the refresh code: plain edge sets."""
    n_new = delta["new_x"].shape[0]
    n = data.num_nodes + n_new
    edges = {tuple(e) for e in data.edge_index.numpy().T.tolist()}
    for s, d in delta["remove_edges"].T.tolist():
        edges -= {(s, d), (d, s)}
    for s, d in delta["add_edges"].T.tolist():
        edges |= {(s, d), (d, s)}
    x = torch.cat([data.x, torch.from_numpy(delta["new_x"])])
    x[torch.from_numpy(delta["update_ids"])] = torch.from_numpy(delta["update_x"])
    pad = torch.zeros(n_new, dtype=torch.bool)
    out = data.clone()
    out.x, out.num_nodes = x, n
    out.edge_index = torch.tensor(sorted(edges), dtype=torch.long).T.contiguous()
    out.y = torch.cat([data.y, torch.zeros(n_new, dtype=data.y.dtype)])
    for part in ("train", "val", "test"):
        out[f"{part}_mask"] = torch.cat([data[f"{part}_mask"], pad])
    return out


def _outputs(export_dir, n: int) -> list[np.ndarray]:
    sess = ort.InferenceSession(str(export_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    return sess.run(None, {"node_ids": np.arange(n, dtype=np.int64)})


@pytest.fixture(scope="module")
def data():
    return load_dataset(DATASET)


@pytest.fixture(scope="module", params=["gcn", "sage"])
def live(request, tmp_path_factory, data):
    """(run dir, parent export, delta file, delta arrays) for one arch."""
    tmp = tmp_path_factory.mktemp(f"refresh_{request.param}")
    run = make_run(tmp / "run", request.param, epochs=5)
    parent = tmp / "parent"
    export(run, parent, fanouts=FANOUTS, progress=False)
    arrays = _delta(data, seed=1)
    path = write_delta(tmp / "delta.npz", **arrays)
    return run, parent, path, arrays


def test_refresh_equals_full_export_of_the_updated_graph(live, data, tmp_path):
    run, parent, delta, arrays = live
    out = tmp_path / "refreshed"
    manifest = refresh(parent, delta, out, progress=False)
    updated = _updated_graph(data, arrays)
    snapshot = save_npz(updated, tmp_path / "updated.npz")
    full = tmp_path / "full"
    export(run, full, fanouts=FANOUTS, dataset=f"npz:{snapshot}", progress=False)
    n = updated.num_nodes
    assert manifest["graph"]["num_nodes"] == n
    assert manifest["graph"]["num_edges"] == updated.edge_index.size(1)
    for got, want in zip(_outputs(out, n), _outputs(full, n), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    # the stored tables themselves are those of the full export (per-node sampling)
    with np.load(out / "graph.npz") as a, np.load(full / "graph.npz") as b:
        for key in ("rowptr", "col", "nbr_0", "nbr_1"):
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    # and the new-node graph reads the refreshed states
    feed = {"features": updated.x[:5].numpy(), "neighbors": -np.ones((5, 4), dtype=np.int64)}
    answers = [ort.InferenceSession(str(d / "new_nodes.onnx")).run(None, feed) for d in (out, full)]
    for a, b in zip(*answers, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_refreshed_export_is_complete_and_records_its_parent(live, tmp_path):
    _run, parent, delta, arrays = live
    out = tmp_path / "refreshed"
    refresh(parent, delta, out, progress=False)
    manifest = read_manifest(out)
    verify_files(out, manifest)
    check_model(manifest, out / "model.onnx")  # metadata copy and table sizes
    prov = manifest["provenance"]["refresh"]
    assert prov["parent"]["path"] == str(parent.resolve())
    assert prov["parent"]["num_nodes"] == read_manifest(parent)["graph"]["num_nodes"]
    assert prov["delta"]["new_nodes"] == arrays["new_x"].shape[0]
    assert prov["delta"]["sha256"] == hashlib.sha256(delta.read_bytes()).hexdigest()
    assert prov["generation"] == 1
    live_files = {"model.onnx", "model.onnx.data", "new_nodes.onnx", "new_nodes.onnx.data"}
    assert set(manifest["files"]) == live_files | {"graph.npz"}
    assert set(read_manifest(parent)["files"]) == live_files | {"graph.npz"}
    assert manifest["validation"]["passed"] is True
    assert any("recomputed" in s for s in manifest["validation"]["input_sets"])
    # a refresh of the refresh chains
    second = write_delta(tmp_path / "d2.npz", new_x=np.ones((1, arrays["new_x"].shape[1])))
    again = refresh(out, second, tmp_path / "again", progress=False)
    assert again["provenance"]["refresh"]["generation"] == 2
    assert again["graph"]["num_nodes"] == manifest["graph"]["num_nodes"] + 1


def test_untouched_rows_keep_their_values(live, tmp_path):
    _run, parent, _delta_file, arrays = live
    n_old = read_manifest(parent)["graph"]["num_nodes"]
    one = write_delta(
        tmp_path / "one.npz", update_ids=np.array([7]), update_x=arrays["update_x"][:1]
    )
    out = tmp_path / "one"
    refresh(parent, one, out, progress=False)
    before, after = _outputs(parent, n_old), _outputs(out, n_old)
    moved = np.abs(before[0] - after[0]).max(1) > 0
    assert moved[7]
    # 2 layers: only node 7 and nodes within 2 hops of it (by the tables) may move
    with np.load(parent / "graph.npz") as g:
        t0, t1 = g["nbr_0"].astype(np.int64), g["nbr_1"].astype(np.int64)
    hop1 = np.zeros(n_old, dtype=bool)
    hop1[7] = True
    hop1 |= (t0 == 7).any(1)
    hop2 = hop1 | hop1[t1].any(1)
    assert not moved[~hop2].any()


def test_refresh_refuses_bad_input(live, tmp_path, data):
    parent = live[1]
    n = data.num_nodes
    bad = write_delta(tmp_path / "bad.npz", remove_edges=np.array([[0], [0 + n - 1]]))
    edges = {tuple(e) for e in data.edge_index.numpy().T.tolist()}
    if (0, n - 1) not in edges:
        with pytest.raises(DatasetError, match="not an edge"):
            refresh(parent, bad, tmp_path / "x", progress=False)
    wide = write_delta(tmp_path / "wide.npz", new_x=np.ones((1, data.num_features + 1)))
    with pytest.raises(DatasetError, match="new_x"):
        refresh(parent, wide, tmp_path / "x", progress=False)
    nan = write_delta(
        tmp_path / "nan.npz",
        update_ids=np.array([1]),
        update_x=np.full((1, data.num_features), np.nan),
    )
    with pytest.raises(DatasetError, match="NaN"):
        refresh(parent, nan, tmp_path / "x", progress=False)
    far = write_delta(tmp_path / "far.npz", add_edges=np.array([[0], [n + 5]]))
    with pytest.raises(DatasetError, match="outside"):
        refresh(parent, far, tmp_path / "x", progress=False)
    empty = write_delta(tmp_path / "empty.npz", add_edges=np.zeros((2, 0), dtype=np.int64))
    with pytest.raises(DatasetError, match="no change"):
        refresh(parent, empty, tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()  # nothing half-written
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("not the tool's")
    with pytest.raises(ConfigError, match="already exists"):
        refresh(parent, live[2], tmp_path / "taken", progress=False)
    with pytest.raises(ConfigError, match="not written by abkd-deploy"):
        refresh(parent, live[2], tmp_path / "taken", force=True, progress=False)
    assert (tmp_path / "taken" / "mine.txt").read_text() == "not the tool's"


def test_refresh_refuses_another_student_and_non_live_exports(live, tmp_path):
    run, parent, delta, _arrays = live
    arch = read_manifest(parent)["model"]["arch"]
    other = make_run(tmp_path / "other", arch, epochs=2, lr=0.05)
    with pytest.raises(CheckpointError, match="another student"):
        refresh(parent, delta, tmp_path / "x", run_dir=other, progress=False)
    tree = tmp_path / "ts"
    export(run, tree, formats=("onnx", "torchscript"), fanouts=FANOUTS, progress=False)
    with pytest.raises(ConfigError, match="cannot refresh"):
        refresh(tree, delta, tmp_path / "x", progress=False)
    int8 = tmp_path / "int8"
    export(run, int8, fanouts=FANOUTS, quantize="int8", progress=False)
    with pytest.raises(ConfigError, match="quantized"):
        refresh(int8, delta, tmp_path / "x", progress=False)
    moved = tmp_path / "moved"
    shutil.copytree(parent, moved)
    (moved / "graph.npz").write_bytes(b"junk")
    with pytest.raises(Exception, match="sha256|bytes"):
        refresh(moved, delta, tmp_path / "x", progress=False)


def test_cli_refresh_publishes_the_next_version(live, tmp_path):
    from click.testing import CliRunner

    from abkd_deploy.cli import main
    from abkd_deploy.model_repo import list_versions

    _run, parent, delta, arrays = live
    repo = tmp_path / "repo" / "student"
    shutil.copytree(parent, repo / "1")
    runner = CliRunner()
    res = runner.invoke(main, ["refresh", str(repo), "--delta", str(delta), "--repo", str(repo)])
    assert res.exit_code == 0, res.output
    assert list_versions(repo) == [1, 2]
    assert "refreshed" in res.output and f"+{arrays['new_x'].shape[0]} nodes" in res.output
    m = read_manifest(repo / "2")
    assert m["provenance"]["refresh"]["parent"]["path"] == str((repo / "1").resolve())
    both = runner.invoke(
        main, ["refresh", str(parent), "--delta", str(delta), "--out", "x", "--repo", "y"]
    )
    assert both.exit_code == 2 and "exactly one of --out" in both.output
    bad = tmp_path / "bad.npz"
    np.savez(bad, colour=np.ones(3))
    res = runner.invoke(main, ["refresh", str(parent), "--delta", str(bad), "--out", "z"])
    assert res.exit_code == 1
    assert res.output.strip().splitlines()[-1].startswith("error: ")
    assert "unknown key 'colour'" in res.output


def test_refresh_keeps_the_slot_weight_layout_of_an_older_sage_export(data, tmp_path, monkeypatch):
    import onnx

    from abkd_deploy.export import modules

    run = make_run(tmp_path / "run", "sage", epochs=5)
    parent = tmp_path / "parent"
    with monkeypatch.context() as patch:  # an export from before the factored layer 1
        patch.setattr(modules, "FACTORED_ARCHS", ())
        export(run, parent, fanouts=FANOUTS, progress=False)
    assert read_manifest(parent)["adjacency"]["table_weights"] == "slots"
    arrays = _delta(data, seed=2)
    out = tmp_path / "refreshed"
    manifest = refresh(parent, write_delta(tmp_path / "d.npz", **arrays), out, progress=False)
    assert manifest["adjacency"]["table_weights"] == "slots"
    names = {t.name for t in onnx.load(str(out / "model.onnx")).graph.initializer}
    assert "last.weight_1" in names and "last.scale_1" not in names
    snapshot = save_npz(_updated_graph(data, arrays), tmp_path / "updated.npz")
    full = tmp_path / "full"  # today's export of the same graph: the factored layout
    export(run, full, fanouts=FANOUTS, dataset=f"npz:{snapshot}", progress=False)
    assert read_manifest(full)["adjacency"]["table_weights"] == "scale"
    n = manifest["graph"]["num_nodes"]
    for got, want in zip(_outputs(out, n), _outputs(full, n), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)

"""Teacher training, distillation and comparison on typed graphs (issue 11, item 3)."""

import json
from dataclasses import replace

import pytest
import torch
from click.testing import CliRunner

from abkd_deploy.cli import main
from abkd_deploy.data import load_dataset
from abkd_deploy.distill import TrainConfig, Trainer, train_teacher
from abkd_deploy.distill.compare import DEFAULT_METHODS, compare
from abkd_deploy.distill.graphs import GraphView, build_for_data, typed_target_edges
from abkd_deploy.distill.losses import LayerDims
from abkd_deploy.distill.objective import Objective
from abkd_deploy.distill.run import KDSpec, StudentSpec, TeacherSpec, distill
from abkd_deploy.errors import CheckpointError, ConfigError

DATA = "csbm-mag:num_papers=800"
HOMOGENEOUS = "csbm:num_nodes=300,num_features=8,num_classes=3"
FAST = TrainConfig(epochs=12, patience=12, progress=False, device="cpu")
STUDENT = StudentSpec(arch="rgcn", layers=2, hidden=8)  # 31x smaller than the 3 x 128 teacher
CHANCE = 1 / 8  # csbm-mag's default 8 classes


@pytest.fixture(scope="module")
def data():
    return load_dataset(DATA)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("typed-teacher")
    train = replace(FAST, epochs=30, patience=30, lr=0.005)
    metrics = train_teacher(DATA, arch="rgcn", layers=3, hidden=128, train=train, out=out)
    assert metrics["params"] > metrics["params_without_embeddings"] > 0
    assert metrics["test_acc"] > 2 * CHANCE
    return out


@pytest.mark.slow
def test_compare_all_methods_on_a_typed_graph(tmp_path, teacher_dir):
    out = tmp_path / "cmp"
    rows = compare(
        DATA,
        teacher=TeacherSpec(path=str(teacher_dir)),
        student=STUDENT,
        train=replace(FAST, epochs=20, patience=20),
        seeds=1,
        out=out,
    )
    assert [r["method"] for r in rows] == list(DEFAULT_METHODS)
    for r in rows:
        m = json.loads((out / r["method"] / "metrics.json").read_text())
        t, s = m["teacher"], m["student"]
        assert m["compression_ratio"] == pytest.approx(
            t["params_without_embeddings"] / s["params_without_embeddings"]
        )
        assert m["compression_ratio_with_embeddings"] == pytest.approx(t["params"] / s["params"])
        assert m["compression_ratio"] >= 30 > m["compression_ratio_with_embeddings"]
        assert s["test_acc"] > 1.5 * CHANCE and s["val_acc"] > 1.5 * CHANCE, r["method"]
        assert t["test_acc"] > 2 * CHANCE
        assert (out / r["method"] / "curves.png").is_file()
    att = json.loads((out / "abkd" / "attention.json").read_text())["matrix"]
    assert len(att) == 2 and all(len(row) == 3 for row in att)  # [L_S, L_T]
    assert all(abs(sum(row) - 1) < 1e-5 for row in att)
    assert "with the embedding tables" in (out / "comparison.md").read_text()


def test_mini_batch_distill_on_a_typed_graph(tmp_path, teacher_dir):
    m = distill(
        DATA,
        teacher=TeacherSpec(path=str(teacher_dir)),
        student=STUDENT,
        kd=KDSpec(method="lsp"),
        train=replace(FAST, epochs=6, batch_size=128, fanouts=(5, 5)),
        out=tmp_path / "lsp",
    )
    assert m["student"]["test_acc"] > 2 * CHANCE
    history = json.loads((tmp_path / "lsp" / "history.json").read_text())
    assert all(h["loss/lsp"] > 0 for h in history)  # edges among the batch's papers exist


def test_cli_distill_with_a_typed_student(tmp_path, teacher_dir):
    out = tmp_path / "abkd"
    args = ["distill", "--dataset", DATA, "--teacher", str(teacher_dir), "--student-arch"]
    args += ["rgcn", "--student-hidden", "8", "--method", "abkd", "--epochs", "3", "--device"]
    args += ["cpu", "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["compression_ratio"] >= 30 and len(m["attention"]) == 2


def test_batch_edges_are_citations_among_the_targets(data):
    sampler = GraphView(data, torch.device("cpu")).sampler([4, 4], "mean", seed=0)
    batch = sampler.sample(torch.arange(0, 600, 2))
    edges = typed_target_edges(batch)
    assert edges.size(1) > 0 and int(edges.max()) < batch.batch_size
    assert bool((edges[0] != edges[1]).all())
    targets = batch.n_id["paper"][: batch.batch_size]
    cites = data.edge_index_dict[("paper", "cites", "paper")]
    known = set(zip(cites[0].tolist(), cites[1].tolist(), strict=True))
    got = zip(targets[edges[0]].tolist(), targets[edges[1]].tolist(), strict=True)
    assert all(pair in known for pair in got)


def test_full_graph_edges_are_the_target_relations(data):
    edges = GraphView(data, torch.device("cpu")).target_edges()
    assert torch.equal(edges, data.edge_index_dict[("paper", "cites", "paper")])


def test_lsp_needs_a_target_to_target_relation(data):
    no_cites = replace(
        data, edge_index_dict={r: e for r, e in data.edge_index_dict.items() if r[0] != r[2]}
    )
    t = build_for_data("rgcn", no_cites, DATA, hidden=8, num_layers=2, dropout=0.5)
    s = build_for_data("rgcn", no_cites, DATA, hidden=4, num_layers=2, dropout=0.5)
    obj = Objective.from_method("lsp", LayerDims(t.layer_dims, s.layer_dims, data.num_classes))
    with pytest.raises(ConfigError, match="lsp needs edges between paper nodes"):
        Trainer(s, no_cites, FAST, objective=obj, teacher=t)


def test_typed_data_and_homogeneous_archs_refuse_each_other(tmp_path, teacher_dir):
    with pytest.raises(ConfigError, match="'gcn' is homogeneous, but dataset .* is a typed"):
        distill(DATA, teacher=TeacherSpec(path=str(teacher_dir)), out=tmp_path / "a")
    with pytest.raises(ConfigError, match="'rgcn' is for typed graphs, but dataset"):
        train_teacher(HOMOGENEOUS, arch="rgcn", train=FAST, out=tmp_path / "b")
    with pytest.raises(CheckpointError, match="is a typed rgcn model, but dataset"):
        distill(HOMOGENEOUS, teacher=TeacherSpec(path=str(teacher_dir)), out=tmp_path / "c")
    other = "csbm-mag:num_papers=900"
    with pytest.raises(CheckpointError, match="built for another typed graph"):
        distill(
            other, teacher=TeacherSpec(path=str(teacher_dir)), student=STUDENT, out=tmp_path / "d"
        )
    args = ["teacher", "--dataset", DATA, "--arch", "sage", "--out", str(tmp_path / "e")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "use a typed architecture" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1

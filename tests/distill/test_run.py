import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from abkd_deploy.cli import main
from abkd_deploy.data import load_dataset
from abkd_deploy.data.graph import FullGraph
from abkd_deploy.distill import TrainConfig, train_teacher
from abkd_deploy.distill.compare import compare
from abkd_deploy.distill.evaluate import full_graph_outputs, split_scores
from abkd_deploy.distill.run import KDSpec, StudentSpec, TeacherSpec, distill
from abkd_deploy.errors import CheckpointError
from abkd_deploy.models import build_model, load_model

DATA = "csbm:num_nodes=800,num_features=12,num_classes=3,homophily=0.85,train_ratio=0.1"
FAST = TrainConfig(epochs=30, patience=30, progress=False, device="cpu")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    train_teacher(DATA, arch="gcnii", layers=4, hidden=16, train=FAST, out=out)
    return out


@pytest.mark.slow
def test_distill_run_dir_and_metrics(tmp_path, teacher_dir):
    out = tmp_path / "run"
    m = distill(
        DATA,
        teacher=TeacherSpec(path=str(teacher_dir)),
        student=StudentSpec(arch="gcn", hidden=4),
        kd=KDSpec(method="abkd"),
        train=FAST,
        seeds=2,
        out=out,
    )
    for name in (
        "student.safetensors",
        "student.json",
        "teacher.safetensors",
        "metrics.json",
        "config.json",
        "curves.png",
        "attention.json",
        "attention.png",
    ):
        assert (out / name).is_file(), name
    assert m["seeds"] == [0, 1] and len(m["per_seed"]) == 2
    assert m["compression_ratio"] == pytest.approx(m["teacher"]["params"] / m["student"]["params"])
    on_disk = json.loads((out / "metrics.json").read_text())
    for key in ("method", "seeds", "compression_ratio", "seconds_per_epoch"):
        assert key in on_disk
    assert on_disk["student"]["test_score_std"] >= 0 and "test_score" in on_disk["teacher"]
    for part in ("student", "teacher"):  # legacy keys, same values
        assert on_disk[part]["test_acc"] == on_disk[part]["test_score"]
    assert on_disk["student"]["test_acc_std"] == on_disk["student"]["test_score_std"]
    assert [s["test_acc"] for s in m["per_seed"]] == [s["test_score"] for s in m["per_seed"]]
    att = json.loads((out / "attention.json").read_text())["matrix"]
    assert len(att) == 2 and len(att[0]) == 4  # student layers x teacher layers
    assert all(abs(sum(row) - 1) < 1e-5 for row in att)


def test_saved_student_has_no_distillation_parameters(tmp_path, teacher_dir):
    distill(
        DATA,
        teacher=TeacherSpec(path=str(teacher_dir)),
        kd=KDSpec(method="abkd"),
        train=FAST,
        out=tmp_path,
    )
    keys = set(load_file(str(tmp_path / "student.safetensors")))
    student, _ = load_model(tmp_path, "student")
    assert keys == set(student.state_dict())
    assert not any(w in k for k in keys for w in ("regressor", "query", "key", "position"))


def test_distillation_improves_over_untrained_student(tmp_path, teacher_dir):
    data = load_dataset(DATA)
    torch.manual_seed(0)
    untrained = build_model("gcn", in_channels=12, hidden=8, out_channels=3, num_layers=2)
    graph = FullGraph.from_edge_index(data.edge_index, data.num_nodes, "gcn")
    before = split_scores(data, full_graph_outputs(untrained, data.x, graph)[0])["test"]
    m = distill(
        DATA,
        teacher=TeacherSpec(path=str(teacher_dir)),
        kd=KDSpec(method="abkd"),
        train=FAST,
        out=tmp_path,
    )
    assert m["student"]["test_score"] > before + 0.2


def test_teacher_from_another_dataset_is_refused_before_training(
    tmp_path, teacher_dir, monkeypatch
):
    called = []
    monkeypatch.setattr("abkd_deploy.distill.run.Trainer.fit", lambda self: called.append(1))
    other = "csbm:num_nodes=800,num_features=7,num_classes=3"
    with pytest.raises(CheckpointError, match="expects 12 features and 3 classes"):
        distill(other, teacher=TeacherSpec(path=str(teacher_dir)), train=FAST, out=tmp_path / "o")
    assert not called and not (tmp_path / "o").exists()


def test_interrupted_run_leaves_no_checkpoint(tmp_path, teacher_dir, monkeypatch):
    def boom(self):
        raise KeyboardInterrupt

    monkeypatch.setattr("abkd_deploy.distill.run.Trainer.fit", boom)
    with pytest.raises(KeyboardInterrupt):
        distill(DATA, teacher=TeacherSpec(path=str(teacher_dir)), train=FAST, out=tmp_path / "o")
    assert not (tmp_path / "o" / "student.safetensors").exists()
    assert not list(tmp_path.glob("**/*.tmp"))


def test_compare_table(tmp_path, teacher_dir):
    rows = compare(
        DATA,
        teacher=TeacherSpec(path=str(teacher_dir)),
        train=FAST,
        seeds=1,
        methods=("ce", "kd"),
        out=tmp_path,
    )
    assert [r["method"] for r in rows] == ["ce", "kd"]
    table = (tmp_path / "comparison.md").read_text()
    assert "| ce |" in table and "| kd |" in table
    written = json.loads((tmp_path / "comparison.json").read_text())["rows"]
    assert written[1]["method"] == "kd" and written == rows
    assert rows[1]["test_acc_mean"] == rows[1]["test_score_mean"]  # legacy key kept


def test_cli_distill_trains_teacher_when_none_given(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(
        main,
        [
            "distill",
            "--dataset",
            DATA,
            "--teacher-arch",
            "gcn",
            "--teacher-layers",
            "2",
            "--teacher-hidden",
            "16",
            "--student-hidden",
            "4",
            "--method",
            "kd",
            "--epochs",
            "10",
            "--device",
            "cpu",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "kd: student gcn" in result.output
    assert (out / "student.safetensors").is_file() and (out / "teacher.safetensors").is_file()


def test_cli_distill_bad_inputs(tmp_path, teacher_dir):
    runner = CliRunner()
    bad_method = runner.invoke(
        main,
        [
            "distill",
            "--dataset",
            DATA,
            "--teacher",
            str(teacher_dir),
            "--method",
            "magic",
            "--out",
            str(tmp_path / "a"),
        ],
    )
    assert bad_method.exit_code == 2 and "unknown KD method 'magic'" in bad_method.output
    missing = runner.invoke(
        main,
        [
            "distill",
            "--dataset",
            DATA,
            "--teacher",
            str(tmp_path / "nope"),
            "--out",
            str(tmp_path / "b"),
        ],
    )
    assert missing.exit_code == 1 and "error:" in missing.output

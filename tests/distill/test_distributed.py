"""Distributed (gloo, 2 processes) distillation: parity, rank sync, failures, export."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from abkd_deploy.distill.distributed import FAIL_EPOCH_ENV, FAIL_RANK_ENV, launch
from abkd_deploy.distill.run import distill
from abkd_deploy.distill.specs import KDSpec, StudentSpec, TeacherSpec
from abkd_deploy.distill.teacher import train_teacher
from abkd_deploy.distill.trainer import TrainConfig
from abkd_deploy.errors import DistributedError

pytestmark = pytest.mark.slow

DATA = "csbm:num_nodes=2000"
BATCH = 250  # per rank under 2 processes: the single-process run uses 2 x BATCH


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    teacher_dir = root / "teacher"
    train_teacher(
        DATA,
        arch="gcn",
        layers=2,
        hidden=32,
        train=TrainConfig(epochs=40, progress=False),
        out=teacher_dir,
    )
    spec = {
        "dataset": DATA,
        "teacher": TeacherSpec(path=str(teacher_dir)),
        "student": StudentSpec(arch="gcn", hidden=16),
        "kd": KDSpec(method="kd"),
    }
    train = TrainConfig(epochs=10, patience=100, batch_size=BATCH, progress=False)
    single = distill(**spec, train=replace(train, batch_size=2 * BATCH), out=root / "single")
    two = launch(2, **spec, train=train, out=root / "two")
    return root, spec, train, single, two


def test_two_ranks_match_single_process_and_stay_in_sync(setup):
    root, _, _, single, two = setup
    info = two["distributed"]
    assert info["world_size"] == 2 and info["backend"] == "gloo"
    assert info["seed_nodes_per_rank"] == 1000  # every node is a KD seed, split in two
    # the frozen teacher's logits for 1000 rows (kd: no hidden layers), float32
    classes = json.loads((root / "teacher" / "teacher.json").read_text())["model"]["out_channels"]
    assert info["teacher_cache_bytes_per_rank"] == 1000 * classes * 4
    # the ranks compared their parameter hashes (a mismatch raises inside the run)
    assert len(info["rank_state_sha256"]) == 64
    acc1, acc2 = single["student"]["test_score"], two["student"]["test_score"]
    assert acc1 > 0.5 and abs(acc1 - acc2) < 0.05, (acc1, acc2)
    assert not list(root.glob(".two.*")), "staging or teacher-shard leftovers"
    assert not (root / "two" / ".work").exists()


def test_run_dir_of_a_distributed_run_exports(setup):
    from abkd_deploy.export.api import export

    root, _, _, _, two = setup
    manifest = export(root / "two", root / "two-export", progress=False)
    assert manifest["accuracy"]["exported"]["onnx"] == pytest.approx(
        manifest["accuracy"]["pytorch_student_exact_graph"], abs=0.02
    )
    assert manifest["accuracy"]["pytorch_student_exact_graph"] == pytest.approx(
        two["student"]["test_score"], abs=1e-6
    )


def test_a_dying_rank_ends_the_run_with_one_line_naming_it(setup, monkeypatch):
    root, spec, train, _, _ = setup
    monkeypatch.setenv(FAIL_RANK_ENV, "1")
    monkeypatch.setenv(FAIL_EPOCH_ENV, "2")
    with pytest.raises(DistributedError) as err:
        launch(2, **spec, train=train, out=root / "dead")
    message = str(err.value)
    assert "\n" not in message
    assert "rank 1" in message and "injected failure" in message, message
    assert not (root / "dead").exists()
    assert not list(root.glob(".dead.*"))


def test_a_rerun_with_the_same_seed_and_ranks_gives_the_same_student(setup):
    root, spec, train, _, two = setup
    again = launch(2, **spec, train=train, out=root / "two-again")
    digest = again["distributed"]["rank_state_sha256"]
    assert digest == two["distributed"]["rank_state_sha256"]
    from safetensors.torch import load_file

    first, second = (load_file(root / d / "student.safetensors") for d in ("two", "two-again"))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


TEACHER = {"dataset": DATA, "arch": "gcn", "layers": 2, "hidden": 32}


def test_a_two_rank_teacher_matches_single_process_and_feeds_distill(setup):
    from safetensors.torch import load_file

    from abkd_deploy.distill.distributed import state_sha256
    from abkd_deploy.models import load_model

    root, spec, train, _, _ = setup
    single = json.loads((root / "teacher" / "metrics.json").read_text())
    two = launch(
        2,
        job="teacher",
        **TEACHER,
        train=TrainConfig(epochs=40, progress=False),  # as the fixture's teacher, full batch
        out=root / "teacher-two",
    )
    info = two["distributed"]
    assert info["world_size"] == 2 and info["backend"] == "gloo"
    from abkd_deploy.data import load_dataset

    labelled = int(load_dataset(DATA).train_mask.sum())
    assert info["seed_nodes_per_rank"] == (labelled + 1) // 2  # rank 0: rows 0::2
    # every rank's parameter hash was compared inside the run; the saved ones are those
    model, _ = load_model(root / "teacher-two", "teacher")
    assert state_sha256(model) == info["rank_state_sha256"]
    assert load_file(root / "teacher-two" / "teacher.safetensors").keys() == (
        load_file(root / "teacher" / "teacher.safetensors").keys()
    )
    assert abs(single["test_score"] - two["test_score"]) < 0.05, (single, two)
    assert not list(root.glob(".teacher-two.*")), "staging leftovers"
    m = distill(
        **{**spec, "teacher": TeacherSpec(path=str(root / "teacher-two"))},
        train=replace(train, epochs=2),
        out=root / "from-two-teacher",
    )
    assert m["teacher"]["test_score"] == pytest.approx(two["test_score"], abs=1e-6)


def test_teacher_nproc_on_the_command_line_mini_batch(setup):
    from click.testing import CliRunner

    from abkd_deploy.cli import main

    root = setup[0]
    out = root / "teacher-cli"
    args = ["teacher", "--dataset", DATA, "--arch", "gcn", "--layers", "2", "--hidden", "32"]
    args += ["--epochs", "5", "--batch-size", str(BATCH), "--nproc", "2", "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert f"-> {out}" in result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["distributed"]["world_size"] == 2 and metrics["epochs_run"] == 5


def test_a_dying_teacher_rank_is_named_and_nothing_is_published(setup, monkeypatch):
    root = setup[0]
    monkeypatch.setenv(FAIL_RANK_ENV, "1")
    with pytest.raises(DistributedError) as err:
        launch(
            2,
            job="teacher",
            **TEACHER,
            train=TrainConfig(epochs=5, progress=False),
            out=root / "teacher-dead",
        )
    assert "\n" not in str(err.value) and "rank 1" in str(err.value)
    assert not (root / "teacher-dead").exists() and not list(root.glob(".teacher-dead.*"))


def test_two_ranks_hold_out_the_same_rows_for_the_attention(setup):
    """``--abkd-holdout`` under two ranks: both split the labelled rows alike (the ranks'
    parameter hashes are compared inside the run) and the run records the option."""
    root, spec, train, _, _ = setup
    kd = KDSpec(method="abkd", attention="prior", holdout=0.3)
    small = replace(train, epochs=3)
    two = launch(2, **{**spec, "kd": kd}, train=small, out=root / "two-holdout")
    assert (
        two["distributed"]["world_size"] == 2 and len(two["distributed"]["rank_state_sha256"]) == 64
    )
    config = json.loads((root / "two-holdout" / "config.json").read_text())
    assert config["kd"]["holdout"] == 0.3 and config["kd"]["attention"] == "prior"
    assert two["attention"] is not None

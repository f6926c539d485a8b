"""Run dirs are staged and published whole, never clobber foreign files, record their
checkpoints' hashes (export refuses a mixed run dir), and SIGTERM leaves nothing behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest

from abkd_deploy.distill import TrainConfig, train_teacher
from abkd_deploy.distill.compare import compare
from abkd_deploy.distill.run import KDSpec, StudentSpec, TeacherSpec, distill
from abkd_deploy.errors import CheckpointError, ConfigError
from abkd_deploy.export import export
from abkd_deploy.files import sha256_file

DATA = "csbm:num_nodes=300,num_features=8,num_classes=3,homophily=0.85,train_ratio=0.1"
FAST = TrainConfig(epochs=5, patience=5, progress=False, device="cpu")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "t"
    train_teacher(DATA, arch="gcn", layers=2, hidden=8, train=FAST, out=out)
    return out


def _distill(out, teacher_dir, method="kd", hidden=4, **kw):
    return distill(
        DATA,
        teacher=TeacherSpec(path=str(teacher_dir)),
        student=StudentSpec(arch="gcn", hidden=hidden),
        kd=KDSpec(method=method),
        train=FAST,
        out=out,
        **kw,
    )


def test_run_dir_records_its_checkpoints(tmp_path, teacher_dir):
    out = tmp_path / "run"
    _distill(out, teacher_dir)
    student, teacher = (
        sha256_file(out / "student.safetensors"),
        sha256_file(out / "teacher.safetensors"),
    )
    for name in ("metrics.json", "config.json"):
        hashes = json.loads((out / name).read_text())["checkpoints"]
        assert hashes == {"student.safetensors": student, "teacher.safetensors": teacher}, name
    record = json.loads((out / "run.json").read_text())
    assert record["command"] == "distill"
    assert set(record["files"]) == {p.name for p in out.iterdir()} - {"run.json"}
    assert record["files"]["student.safetensors"]["sha256"] == student
    assert not (out / ".work").exists()
    teacher_record = json.loads((teacher_dir / "run.json").read_text())
    assert teacher_record["command"] == "teacher"


def test_existing_out_is_refused_before_training(tmp_path, teacher_dir, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    called = []
    monkeypatch.setattr("abkd_deploy.distill.run.Trainer.fit", lambda self: called.append(1))
    with pytest.raises(ConfigError, match="already exists; use --force"):
        _distill(out, teacher_dir)
    with pytest.raises(ConfigError, match="'thesis.tex' was not written by abkd-deploy"):
        _distill(out, teacher_dir, force=True)
    with pytest.raises(ConfigError, match="is the source directory"):
        _distill(teacher_dir, teacher_dir, force=True)
    assert not called
    assert (out / "thesis.tex").read_text() == "years of work"
    assert (teacher_dir / "teacher.safetensors").is_file()


def test_force_rerun_replaces_the_whole_run_dir(tmp_path, teacher_dir):
    out = tmp_path / "run"
    _distill(out, teacher_dir, method="abkd")
    assert (out / "attention.json").is_file()
    _distill(out, teacher_dir, method="kd", force=True)
    assert not (out / "attention.json").exists()  # no stale files of the earlier run
    assert json.loads((out / "metrics.json").read_text())["method"] == "kd"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_export_refuses_a_run_dir_mixing_two_runs(tmp_path, teacher_dir):
    a, b = tmp_path / "a", tmp_path / "b"
    _distill(a, teacher_dir, hidden=4)
    _distill(b, teacher_dir, hidden=6)
    for name in ("student.safetensors", "student.json"):  # b's student beside a's metrics
        shutil.copyfile(b / name, a / name)
    with pytest.raises(
        CheckpointError, match=r"student\.(json|safetensors) does not match its sha256"
    ):
        export(a, tmp_path / "e", progress=False)
    (a / "run.json").unlink()  # an older run dir without run.json: the metrics still tell
    with pytest.raises(CheckpointError, match=r"metrics.json records another student") as info:
        export(a, tmp_path / "e", progress=False)
    assert "\n" not in str(info.value) and not (tmp_path / "e").exists()


def test_compare_is_published_whole_with_its_teacher(tmp_path):
    out = tmp_path / "cmp"
    compare(
        DATA,
        teacher=TeacherSpec(arch="gcn", layers=2, hidden=8),
        train=FAST,
        seeds=1,
        methods=("ce",),
        out=out,
    )
    record = json.loads((out / "run.json").read_text())["files"]
    assert {"teacher/teacher.safetensors", "ce/student.safetensors", "comparison.md"} <= set(record)
    config = json.loads((out / "ce" / "config.json").read_text())
    assert config["teacher"]["path"] == str(out / "teacher")  # not the staging dir
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cmp"]


def test_run_dir_files_follow_the_umask(tmp_path, teacher_dir):
    old = os.umask(0o027)
    try:
        _distill(tmp_path / "run", teacher_dir)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "run").stat().st_mode) == 0o750
    for path in (tmp_path / "run").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o640, path.name


@pytest.mark.slow
def test_sigterm_mid_training_publishes_nothing(tmp_path):
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "abkd_deploy.cli",
        "distill",
        "--dataset",
        DATA,
        "--teacher-arch",
        "gcn",
        "--teacher-layers",
        "2",
        "--epochs",
        "1000000",
        "--patience",
        "1000000",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    with open(tmp_path / "log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while not any((tmp_path / p.name / ".work").exists() for p in tmp_path.glob(".run.*")):
            assert proc.poll() is None and time.monotonic() < deadline, "no staging dir"
            time.sleep(0.2)
        time.sleep(1.0)  # now inside the teacher's training loop
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
    output = (tmp_path / "log").read_text()
    assert rc == 128 + signal.SIGTERM, output[-2000:]
    assert "interrupted (SIGTERM)" in output and "Traceback" not in output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log"]  # no run, no staging

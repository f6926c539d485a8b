"""``export --out``/``--force`` never deletes what the tool did not write, never overlaps
the run dir, follows the umask; wrong source dirs get one clear line (also serve/bench)."""

from __future__ import annotations

import json
import os
import shutil
import stat

import pytest
from click.testing import CliRunner

from abkd_deploy.cli import main

from .conftest import make_run


@pytest.fixture
def run(gcn_run, tmp_path):
    """A private copy of the session's run dir (these tests try to destroy it)."""
    return shutil.copytree(gcn_run, tmp_path / "run")


def _export(*args: str):
    return CliRunner().invoke(main, ["export", *map(str, args)])


def _snapshot(directory):
    return {p.relative_to(directory): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


@pytest.mark.parametrize("how", ["same", "dot", "dotdot", "symlink", "inside", "parent"])
def test_out_overlapping_the_run_dir_is_refused_even_with_force(run, tmp_path, how):
    (tmp_path / "link").symlink_to(run)
    out = {
        "same": run,
        "dot": f"{run}/.",
        "dotdot": f"{run}/x/..",
        "symlink": tmp_path / "link",
        "inside": run / "export",
        "parent": tmp_path,
    }[how]
    before = _snapshot(run)
    result = _export(run, "--out", out, "--force")
    assert result.exit_code == 2, result.output
    assert "source directory" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert _snapshot(run) == before and sorted(p.name for p in tmp_path.iterdir()) == [
        "link",
        "run",
    ]


def test_force_over_a_folder_of_user_files_is_refused(run, tmp_path):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "taxes.pdf").write_bytes(b"%PDF")
    result = _export(run, "--out", user, "--force")
    assert result.exit_code == 2 and "'taxes.pdf' was not written by abkd-deploy" in result.output
    assert (user / "taxes.pdf").read_bytes() == b"%PDF"


def test_force_replaces_a_previous_export_but_not_a_file_added_to_it(run, tmp_path):
    out = tmp_path / "export"
    assert _export(run, "--out", out).exit_code == 0
    first = json.loads((out / "manifest.json").read_text())
    (out / "notes.md").write_text("my notes")
    result = _export(run, "--out", out, "--force")
    assert result.exit_code == 2 and "'notes.md' was not written" in result.output
    assert (out / "notes.md").read_text() == "my notes"
    (out / "notes.md").unlink()
    result = _export(run, "--out", out, "--force", "--seed", "1")
    assert result.exit_code == 0, result.output
    second = json.loads((out / "manifest.json").read_text())
    assert second["adjacency"]["sampling_seed"] == 1 != first["adjacency"]["sampling_seed"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "run"]


def test_export_files_follow_the_umask(run, tmp_path):
    old = os.umask(0o027)
    try:
        assert _export(run, "--out", tmp_path / "e").exit_code == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "e").stat().st_mode) == 0o750
    for path in (tmp_path / "e").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o640, path.name


def test_missing_run_dir_says_it_does_not_exist(tmp_path):
    result = _export(tmp_path / "runs" / "does-not-exist", "--out", tmp_path / "e")
    assert result.exit_code == 1
    assert "does-not-exist' does not exist" in result.output and "student.json" not in result.output


def test_an_export_or_teacher_dir_given_to_export_is_named(run, tmp_path):
    out = tmp_path / "e"
    assert _export(run, "--out", out).exit_code == 0
    result = _export(out, "--out", tmp_path / "e2")
    assert result.exit_code == 2 and "is an export directory" in result.output
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "teacher.json").write_text("{}")
    result = _export(teacher, "--out", tmp_path / "e3")
    assert result.exit_code == 2 and "is a teacher run dir" in result.output


@pytest.mark.parametrize("command", ["serve", "bench"])
def test_a_run_dir_given_to_serve_or_bench_is_named(tmp_path, command):
    run = make_run(tmp_path / "run", "gcn", epochs=1)
    result = CliRunner().invoke(main, [command, str(run)])
    assert result.exit_code != 0
    assert "is a distill run dir, not an export" in result.output
    assert "abkd-deploy export" in result.output and "Traceback" not in result.output

"""Output directories (abkd_deploy.staging) and bench report paths: never lose a user's
files, never publish half a directory, follow the umask, clean up after killed runs."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from abkd_deploy.errors import ConfigError
from abkd_deploy.files import atomic_path, write_json
from abkd_deploy.serve.report_path import check_report_path
from abkd_deploy.staging import (
    check_out_dir,
    foreign_entry,
    staged_directory,
    write_run_record,
)


def _export_like(directory: Path, extra: str | None = None) -> Path:
    """A directory as an export writes it: model.onnx + manifest.json listing it."""
    directory.mkdir()
    (directory / "model.onnx").write_bytes(b"onnx")
    manifest = {"producer": {"name": "abkd-deploy"}, "files": {"model.onnx": {}}}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    if extra:
        (directory / extra).write_text("the user's")
    return directory


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def test_force_replaces_only_what_the_tool_wrote(tmp_path):
    out = _export_like(tmp_path / "out", extra="notes.txt")
    with pytest.raises(ConfigError, match=r"'notes.txt' was not written by abkd-deploy") as info:
        check_out_dir(out, force=True)
    assert "\n" not in str(info.value)
    assert (out / "notes.txt").read_text() == "the user's"
    (out / "notes.txt").unlink()
    with staged_directory(out, force=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging / old dir left


def test_force_refuses_a_directory_without_record(tmp_path):
    user = tmp_path / "photos"
    user.mkdir()
    (user / "cat.jpg").write_bytes(b"jpg")
    with (
        pytest.raises(ConfigError, match="not written by abkd-deploy"),
        staged_directory(user, force=True) as tmp,
    ):
        (tmp / "x").write_text("x")
    assert (user / "cat.jpg").read_bytes() == b"jpg"
    assert [p.name for p in tmp_path.iterdir()] == ["photos"]


def test_existing_out_needs_force_but_an_empty_dir_is_fine(tmp_path):
    own = _export_like(tmp_path / "own")
    with pytest.raises(ConfigError, match="already exists; use --force"):
        check_out_dir(own)
    (tmp_path / "empty").mkdir()
    with staged_directory(tmp_path / "empty") as tmp:
        (tmp / "a").write_text("a")
    assert (tmp_path / "empty" / "a").read_text() == "a"
    (tmp_path / "file").write_text("f")
    with pytest.raises(ConfigError, match="exists and is not a directory"):
        check_out_dir(tmp_path / "file", force=True)


def test_nested_record_lists_every_file(tmp_path):
    run = tmp_path / "cmp"
    (run / "kd").mkdir(parents=True)
    (run / "kd" / "student.json").write_text("{}")
    (run / "comparison.json").write_text("{}")
    write_run_record(run, "compare")
    assert set(json.loads((run / "run.json").read_text())["files"]) == {
        "kd/student.json",
        "comparison.json",
    }
    assert foreign_entry(run) is None
    (run / "kd" / "mine.txt").write_text("x")
    assert foreign_entry(run) == "kd/mine.txt"
    (run / "kd" / "mine.txt").unlink()
    (run / "extra").mkdir()
    assert foreign_entry(run) == "extra"


def _variants(tmp_path: Path) -> dict[str, tuple[Path, Path]]:
    src = tmp_path / "run"
    src.mkdir()
    (src / "student.safetensors").write_bytes(b"weights")
    (tmp_path / "link").symlink_to(src)
    return {
        "equal": (src, src),
        "dot": (src, src / "."),
        "dotdot": (src, src / "sub" / ".."),
        "symlink": (src, tmp_path / "link"),
        "inside": (src, src / "export"),
        "contains": (src, tmp_path),
        "contains-via-dotdot": (src, src / ".."),
    }


@pytest.mark.parametrize(
    "case", ["equal", "dot", "dotdot", "symlink", "inside", "contains", "contains-via-dotdot"]
)
def test_out_overlapping_its_source_is_refused(tmp_path, case):
    src, out = _variants(tmp_path)[case]
    with (
        pytest.raises(ConfigError, match="source directory") as info,
        staged_directory(out, force=True, sources=[src]) as tmp,
    ):
        (tmp / "x").write_text("x")
    assert "\n" not in str(info.value)
    assert (src / "student.safetensors").read_bytes() == b"weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "run"]


def test_failed_block_publishes_nothing_and_leaves_no_staging(tmp_path):
    with pytest.raises(RuntimeError), staged_directory(tmp_path / "out") as tmp:
        (tmp / "half").write_text("half")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True,
                          capture_output=True, text=True)  # fmt: skip
    return int(proc.stdout)


def test_leftovers_of_dead_processes_are_removed(tmp_path, capsys):
    dead = tmp_path / f".out.{_dead_pid()}.0badf00d.tmp"
    dead.mkdir()
    (dead / "student.safetensors").write_bytes(b"half")
    alive = tmp_path / f".out.{os.getppid()}.0badf00d.tmp"  # pytest's parent: still running
    alive.mkdir()
    dead_file = tmp_path / f".r.json.{_dead_pid()}.00c0ffee.tmp"
    dead_file.write_text("{")
    legacy = tmp_path / ".distill-k2j3h4"  # an older version's leftover: reported, kept
    legacy.mkdir()
    with staged_directory(tmp_path / "out") as tmp:
        (tmp / "a").write_text("a")
    write_json(tmp_path / "r.json", {"ok": True})
    assert not dead.exists() and not dead_file.exists() and alive.exists()
    err = capsys.readouterr().err
    assert "no longer runs" in err and f"{legacy} looks like the leftover" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [alive.name, legacy.name, "out", "r.json"]
    )


def test_published_files_and_dirs_follow_the_umask(tmp_path, umask_027):
    write_json(tmp_path / "m.json", {"a": 1})
    with atomic_path(tmp_path / "w.bin") as tmp:
        tmp.write_bytes(b"x")
    with staged_directory(tmp_path / "out") as stage:
        write_json(stage / "manifest.json", {"a": 1})
        (stage / "sub").mkdir(mode=0o700)
        write_json(stage / "sub" / "x.json", {})
    for path in ("m.json", "w.bin", "out/manifest.json", "out/sub/x.json"):
        assert stat.S_IMODE((tmp_path / path).stat().st_mode) == 0o640, path
    for path in ("out", "out/sub"):
        assert stat.S_IMODE((tmp_path / path).stat().st_mode) == 0o750, path


def test_bench_report_never_inside_the_benchmarked_dirs(tmp_path):
    export_dir = _export_like(tmp_path / "export")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for out in (export_dir / "bench.json", export_dir, run_dir / "b.json"):
        with pytest.raises(ConfigError, match="being benchmarked"):
            check_report_path(out, (export_dir, run_dir))
    with pytest.raises(ConfigError, match="give a .json path"):
        check_report_path(tmp_path / "bench.md", ())


def test_bench_report_overwrites_only_its_own_report(tmp_path):
    (tmp_path / "README.md").write_text("the user's readme")
    with pytest.raises(ConfigError, match=r"refusing to overwrite .*README.md"):
        check_report_path(tmp_path / "README.json", ())
    assert (tmp_path / "README.md").read_text() == "the user's readme"
    (tmp_path / "data.json").write_text('{"mine": 1}')
    with pytest.raises(ConfigError, match=r"refusing to overwrite .*data.json"):
        check_report_path(tmp_path / "data.json", ())
    report = {"producer": {"name": "abkd-deploy"}, "results": []}
    (tmp_path / "bench.json").write_text(json.dumps(report))
    (tmp_path / "bench.md").write_text("old table")
    paths = check_report_path(tmp_path / "bench.json", ())
    assert [p.name for p in paths] == ["bench.json", "bench.md", "bench.png"]

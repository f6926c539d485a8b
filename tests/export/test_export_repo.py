"""``abkd-deploy export RUN --repo REPO/<model>``: the next version, published atomically."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from abkd_deploy.cli import main
from abkd_deploy.model_repo import list_versions
from abkd_deploy.serve import Predictor


def test_export_into_a_model_repository(sage_run: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "repo" / "sage"
    (model_dir / "7").mkdir(parents=True)  # an existing (foreign) version: never touched
    (model_dir / "7" / "note").write_text("keep")
    runner = CliRunner()
    args = ["export", str(sage_run), "--repo", str(model_dir), "--fanout", "5,5"]
    res = runner.invoke(main, args)
    assert res.exit_code == 0, res.output
    assert f"{model_dir / '8'} (version 8)" in res.output
    assert list_versions(model_dir) == [7, 8]
    assert (model_dir / "7" / "note").read_text() == "keep"
    assert sorted(p.name for p in model_dir.iterdir()) == ["7", "8"]  # no staging left
    manifest = json.loads((model_dir / "8" / "manifest.json").read_text())
    assert manifest["adjacency"]["fanouts"] == [5, 5]
    assert len(Predictor(model_dir / "8", device="cpu").predict([0, 1])) == 2

    for extra, text in (
        ([], "give exactly one of --out DIR and --repo"),
        (["--repo", str(model_dir), "--out", str(tmp_path / "x")], "give exactly one of"),
        (["--repo", str(model_dir), "--force"], "--force is for --out"),
        (["--repo", str(model_dir / "8")], "is an export directory"),
        (["--repo", str(sage_run / "m")], "inside the source directory"),
    ):
        res = runner.invoke(main, ["export", str(sage_run), *extra])
        assert res.exit_code == 2 and text in res.output, res.output
    assert list_versions(model_dir) == [7, 8]

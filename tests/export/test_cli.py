"""``abkd-deploy export`` exit codes and output (click's CliRunner)."""

import json

from click.testing import CliRunner

from abkd_deploy.cli import main


def test_cli_export_success_and_refusals(sage_run, tmp_path):
    runner = CliRunner()
    out = tmp_path / "exp"
    args = ["export", str(sage_run), "--out", str(out), "--format", "onnx", "--format", "pt2"]
    result = runner.invoke(main, [*args, "--fanout", "5,5", "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert "onnx" in result.output and "max abs diff" in result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["adjacency"]["fanouts"] == [5, 5]
    assert manifest["adjacency"]["sampling_seed"] == 3
    assert set(manifest["artifacts"]) == {"onnx", "pt2"}

    again = runner.invoke(main, args)
    assert again.exit_code == 2 and "already exists" in again.output

    other = str(tmp_path / "other")
    for extra, code, text in (
        (["--opset", "15"], 2, "opset 15 is not supported"),
        (["--format", "tflite"], 2, "unknown export format 'tflite'"),
        (["--adjacency", "dense"], 2, "unknown adjacency format 'dense'"),
    ):
        res = runner.invoke(main, ["export", str(sage_run), "--out", other, *extra])
        assert res.exit_code == code and text in res.output, res.output
    res = runner.invoke(main, ["export", str(tmp_path), "--out", other])
    assert res.exit_code == 1 and "no student checkpoint" in res.output
    assert not (tmp_path / "other").exists()

import json

import pytest
import torch
from click.testing import CliRunner

from abkd_deploy import __version__
from abkd_deploy.cli import main

TINY = "csbm:num_nodes=400,num_features=8,num_classes=3"


@pytest.fixture()
def runner():
    return CliRunner()


def test_help_lists_commands(runner):
    result = runner.invoke(main, ["--help"])
    assert result.exit_code == 0
    for cmd in ("teacher", "distill", "export", "serve", "bench"):
        assert cmd in result.output


def test_version(runner):
    result = runner.invoke(main, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


def test_teacher_writes_run_dir(runner, tmp_path):
    out = tmp_path / "t"
    args = [
        "teacher",
        "--dataset",
        TINY,
        "--arch",
        "gcn",
        "--layers",
        "2",
        "--hidden",
        "8",
        "--epochs",
        "5",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("val_acc", "test_acc", "params"):
        assert key in metrics
    assert metrics["params"] == 8 * 8 + 8 + 8 * 3 + 3
    assert (out / "teacher.safetensors").is_file() and (out / "curves.png").stat().st_size > 1000
    assert json.loads((out / "teacher.json").read_text())["dataset"]["name"] == TINY


def test_unknown_dataset_exit_2_lists_known(runner, tmp_path):
    result = runner.invoke(main, ["teacher", "--dataset", "imagenet", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "unknown dataset 'imagenet'" in result.output and "planetoid" in result.output
    assert "Traceback" not in result.output


def test_unknown_arch_exit_2(runner, tmp_path):
    result = runner.invoke(
        main, ["teacher", "--dataset", TINY, "--arch", "gin", "--out", str(tmp_path)]
    )
    assert result.exit_code == 2 and "unknown architecture 'gin'" in result.output


def test_missing_root_files_exit_1(runner, tmp_path):
    result = runner.invoke(
        main,
        [
            "teacher",
            "--dataset",
            "planetoid:Cora",
            "--root",
            str(tmp_path),
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert result.exit_code == 1 and "error:" in result.output
    assert "Traceback" not in result.output


def test_wrong_split_name_exit_2(runner, tmp_path, planetoid_root):
    result = runner.invoke(
        main,
        [
            "teacher",
            "--dataset",
            "planetoid:Cora",
            "--root",
            str(planetoid_root),
            "--split",
            "nope",
            "--out",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 2 and "'nope'" in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_device_cuda_without_cuda_is_an_error(runner, tmp_path):
    result = runner.invoke(
        main, ["teacher", "--dataset", TINY, "--device", "cuda", "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 1 and "CUDA is not available" in result.output
    assert not (tmp_path / "o").exists()


def test_usage_error_exit_2(runner):
    result = runner.invoke(main, ["teacher", "--epochs", "zero"])
    assert result.exit_code == 2

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
    for key in ("val_score", "test_score", "train_score", "params"):
        assert key in metrics
    assert metrics["metric"] == "accuracy"
    for split in ("val", "test", "train"):  # the legacy names keep the same values
        assert metrics[f"{split}_acc"] == metrics[f"{split}_score"]
    assert metrics["params"] == 8 * 8 + 8 + 8 * 3 + 3
    assert (out / "teacher.safetensors").is_file() and (out / "curves.png").stat().st_size > 1000
    assert json.loads((out / "teacher.json").read_text())["dataset"]["name"] == TINY


@pytest.mark.parametrize("command", ["teacher", "distill", "compare"])
def test_force_replaces_a_run_dir_this_tool_wrote(runner, tmp_path, command):
    out = tmp_path / command
    args = [command, "--dataset", TINY, "--epochs", "3", "--device", "cpu", "--out", str(out)]
    if command == "teacher":
        args += ["--arch", "gcn", "--layers", "2", "--hidden", "8"]
    else:
        args += ["--teacher-arch", "gcn", "--teacher-layers", "2", "--teacher-hidden", "8"]
        args += ["--methods", "kd"] if command == "compare" else ["--method", "kd"]
    first = runner.invoke(main, args)
    assert first.exit_code == 0, first.output
    before = (out / "run.json").read_text()
    again = runner.invoke(main, args)
    assert again.exit_code == 2 and "--force" in again.output  # refused without it
    assert (out / "run.json").read_text() == before
    forced = runner.invoke(main, [*args, "--force", "--seed", "1"])
    assert forced.exit_code == 0, forced.output
    assert (out / "run.json").read_text() != before  # a new run took its place
    (out / "mine.txt").write_text("not the tool's")  # a foreign file: never replaced
    refused = runner.invoke(main, [*args, "--force"])
    assert refused.exit_code == 2 and (out / "mine.txt").is_file()


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


_REJECT_BEFORE_TORCH = """
import json, sys
from abkd_deploy.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    print(json.dumps({"code": exc.code, "torch": "torch" in sys.modules}))
"""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["teacher", "--arch", "gcnn"], "unknown architecture 'gcnn'; did you mean 'gcn'?"),
        (["teacher", "--dataset", "planetiod:Cora"], "did you mean 'planetoid'?"),
        (["distill", "--method", "abdk"], "unknown KD method 'abdk'; did you mean 'abkd'?"),
        (["distill", "--student-arch", "sag"], "did you mean 'sage'?"),
        (["compare", "--methods", "kd,fitnett"], "did you mean 'fitnet'?"),
        (["export", "r", "--out", "e", "--format", "onx"], "did you mean 'onnx'?"),
        (["export", "r", "--out", "e", "--adjacency", "el"], "did you mean 'ell'?"),
        (["export", "r", "--out", "e", "--dtype", "fp16"], "unknown dtype 'fp16'"),
        (["bench", "e", "--models", "student-onx"], "did you mean 'student-onnx'?"),
    ],
)
def test_bad_name_is_rejected_before_torch_is_imported(tmp_path, args, message):
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", _REJECT_BEFORE_TORCH, *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"code": 2, "torch": False}
    assert proc.stderr.startswith("error: ") and message in proc.stderr
    assert "expected one of:" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_piped_output_has_no_carriage_returns_and_ends_with_results(tmp_path):
    """Into a pipe (a log, CI): bounded plain lines, every stage's result line, once."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "ABKD_PROGRESS"}
    run = tmp_path / "run"
    args = ["distill", "--dataset", TINY, "--teacher-arch", "gcn", "--teacher-layers", "2"]
    args += ["--teacher-hidden", "8", "--epochs", "30", "--device", "cpu", "--out", str(run)]
    proc = subprocess.run(
        [sys.executable, "-m", "abkd_deploy.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stdout + proc.stderr
    err = proc.stderr.splitlines()
    assert len(err) <= 2 * 12  # two trainings, at most 11 lines + a summary each
    assert sum(line.startswith("teacher gcn: 30 epochs, best epoch") for line in err) == 1
    assert sum(line.startswith("abkd seed 0: 30 epochs, best epoch") for line in err) == 1
    (result,) = proc.stdout.splitlines()
    assert result.startswith("abkd: student gcn") and result.endswith(f"-> {run}")

    exported = CliRunner().invoke(main, ["export", str(run), "--out", str(tmp_path / "exp")])
    assert exported.exit_code == 0, exported.output
    assert "\r" not in exported.output
    (summary,) = exported.stdout.splitlines()  # printed once
    assert summary.startswith("exported gcn student (embedded") and "onnx " in summary


def test_readme_main_command_is_one_line_the_cli_accepts():
    """The README's main job must stay runnable: one line, every abkd-deploy step parses."""
    import shlex
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("<!-- main-command -->", 1)[1].split("```bash\n", 1)[1]
    lines = block.split("```", 1)[0].strip().splitlines()
    assert len(lines) == 1
    steps = [shlex.split(step) for step in lines[0].split("&&")]
    commands = [step[1:] for step in steps if step[0] == "abkd-deploy"]
    assert [c[0] for c in commands] == ["distill", "export", "bench"]
    for name, *args in commands:
        command = main.get_command(None, name)
        ctx = command.make_context(name, list(args))  # raises on an unknown option
        assert ctx.params.get("out") or ctx.params.get("out_dir")  # each step writes somewhere
        if name in ("distill", "export"):  # re-runnable in the same clone
            assert ctx.params["force"] is True, name


def test_kd_options_come_from_the_spec_fields():
    """One declaration: every ``cli`` field of the specs is an option, parsed into the spec."""
    import dataclasses

    from abkd_deploy.cli import _distill_specs
    from abkd_deploy.distill.specs import KDSpec, StudentSpec, TeacherSpec

    for name in ("distill", "compare"):
        opts = {o for p in main.get_command(None, name).params for o in p.opts}
        for spec in (TeacherSpec, StudentSpec, KDSpec):
            for f in dataclasses.fields(spec):
                if f.metadata.get("cli"):
                    assert f.metadata["cli"].split("/")[0] in opts, (name, f.name)
    args = ["--abkd-dissimilarity", "similarity", "--kd-nodes", "7", "--no-normalize"]
    args += ["--tau", "2", "--teacher", "t", "--student-hidden", "5", "--teacher-lr", "0.5"]
    ctx = main.get_command(None, "distill").make_context("distill", args)
    params = dict(ctx.params)
    for own in ("method", "out", "nproc"):  # distill's own options, not spec fields
        params.pop(own, None)
    specs = _distill_specs(params)
    assert specs["kd"] == KDSpec(dissimilarity="similarity", kd_nodes=7, normalize=False, tau=2)
    assert specs["teacher"] == TeacherSpec(path="t")
    assert specs["student"] == StudentSpec(hidden=5)
    assert specs["train"].teacher_lr == 0.5 and specs["force"] is False
    assert not params  # every option was consumed


def test_abkd_attention_options_reach_the_term_and_match_its_choices():
    """``--abkd-attention`` and its two knobs build a KDSpec routed to the abkd term; the
    torch-free choice list is the term's own."""
    from abkd_deploy.cli import _distill_specs
    from abkd_deploy.distill.losses.abkd import ATTENTION_CHOICES
    from abkd_deploy.distill.specs import ABKD_ATTENTIONS

    assert ABKD_ATTENTIONS == ATTENTION_CHOICES
    args = ["--teacher", "t", "--abkd-attention", "prior", "--abkd-prior-temperature", "3"]
    args += ["--abkd-entropy-floor", "0.25"]
    params = dict(main.get_command(None, "distill").make_context("distill", args).params)
    for own in ("method", "out", "nproc"):
        params.pop(own, None)
    kd = _distill_specs(params)["kd"]
    assert kd.term_options() == {
        "attention": "prior",
        "entropy_floor": 0.25,
        "prior_temperature": 3.0,
        "dissimilarity": "feature",
    }
    runner = CliRunner()
    bad = runner.invoke(main, ["distill", "--teacher", "t", "--abkd-attention", "argmax"])
    assert bad.exit_code == 2 and "argmax" in bad.output and "prior" in bad.output
    for flag, value in (("--abkd-entropy-floor", "1"), ("--abkd-prior-temperature", "0")):
        bad = runner.invoke(main, ["distill", "--teacher", "t", flag, value])
        assert bad.exit_code == 2 and flag in bad.output, (flag, bad.output)


def test_kd_term_options_are_routed_to_their_method_only():
    from abkd_deploy.distill.specs import KDSpec

    assert KDSpec(method="kd", kd_nodes=5).term_options() == {}
    assert KDSpec(kd_nodes=5).term_options() == {"dissimilarity": "feature", "kd_nodes": 5}
    assert KDSpec(options={"kd_nodes": 9, "attention": "uniform"}).term_options() == {
        "kd_nodes": 9,
        "attention": "uniform",
        "dissimilarity": "feature",
    }

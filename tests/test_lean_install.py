"""`pip install abkd-deploy` without extras: a fresh venv (no system site-packages) gets the
serving set only, and `Predictor`, `serve` and `triton` work there with torch absent, while
the training commands say in one line which extra they need.

Run ``python -m pytest -q -s tests/test_lean_install.py`` to see the serving process's RSS.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from abkd_deploy.extras import TRAINING_PACKAGES
from abkd_deploy.serve import Predictor
from tests.serve.tiny_export import make_tiny, write_embedded

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "abkd_deploy")
IDS = [0, 7, 123, 499, 42]
# (subcommand, arguments before --out that click accepts): each needs the `train` extra.
TRAINING_COMMANDS = [
    ("teacher", []),
    ("distill", []),
    ("compare", []),
    ("export", ["RUN"]),
    ("bench", ["EXPORT"]),
]
PREDICT = """
import json, sys
import abkd_deploy
from abkd_deploy.serve import Predictor
p = Predictor(sys.argv[1], device="cpu", threads=1)
pred = p.predict(json.loads(sys.argv[2]), return_embedding=True)
print(json.dumps({
    "classes": pred.classes.tolist(), "scores": pred.scores.tolist(),
    "embedding": pred.embedding.tolist(), "provider": p.provider,
    "package": abkd_deploy.__file__,
    "training_modules": sorted(m for m in sys.modules if m.split(".")[0] in sys.argv[3:]),
}))
"""


class LeanVenv:
    """A venv holding ``abkd-deploy`` installed without extras (and what pip resolved)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.python = root / "venv" / "bin" / "python"
        self.cli = root / "venv" / "bin" / "abkd-deploy"
        self.env = {
            k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")
        } | {"PYTHONNOUSERSITE": "1"}

    def run(self, *args: Any, timeout: float = 120) -> subprocess.CompletedProcess:
        """Runs a command of the venv outside the repo (so only the installed package imports)."""
        return subprocess.run(
            [str(a) for a in args],
            cwd=self.root,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )


def _pip(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _setuptools_major() -> int:
    try:
        return int(importlib.metadata.version("setuptools").split(".")[0])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return 0


def _tail(proc: subprocess.CompletedProcess, lines: int = 15) -> str:
    return "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-lines:])


@pytest.fixture(scope="module")
def lean(tmp_path_factory: pytest.TempPathFactory) -> LeanVenv:
    """Builds the wheel from a copy of the sources (no build/ or egg-info in the repo) and
    installs it, without extras, into a fresh venv; skips only if no venv can be created
    or the package index cannot be reached."""
    venv = LeanVenv(tmp_path_factory.mktemp("lean"))
    src = venv.root / "src"
    src.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
            shutil.copytree(REPO / name, src / name, ignore=ignore)
        else:
            shutil.copy2(REPO / name, src / name)
    made = subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv.root / "venv")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if made.returncode != 0 or not venv.python.exists():
        pytest.skip(f"cannot create a venv: {_tail(made, 3)}")
    # No build isolation when a recent setuptools is at hand: it saves fetching it each run.
    isolation = ["--no-build-isolation"] if _setuptools_major() >= 68 else []
    built = _pip("wheel", "-q", "--no-deps", *isolation, "-w", str(venv.root / "wheel"), str(src))
    assert built.returncode == 0, f"cannot build the wheel:\n{_tail(built)}"
    wheel = next((venv.root / "wheel").glob("abkd_deploy-*.whl"))
    # pip >= 22.3 installs into another interpreter's environment (--python); no pip there.
    installed = _pip("--python", str(venv.python), "install", "-q", "--no-compile", str(wheel))
    if installed.returncode != 0:
        probe = _pip("download", "-q", "--no-deps", "-d", str(venv.root / "probe"), "click")
        if probe.returncode != 0:
            pytest.skip(f"package index unreachable: {_tail(probe, 3)}")
        pytest.fail(f"pip install {wheel.name} failed:\n{_tail(installed)}")
    return venv


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_embedded(tmp_path_factory.mktemp("export") / "embedded", make_tiny())


def test_no_training_package_is_installed(lean: LeanVenv) -> None:
    proc = lean.run(lean.python, "-c", "import torch")
    assert proc.returncode != 0 and "No module named 'torch'" in proc.stderr, proc.stderr
    code = (
        "import importlib.util as u, json, sys\n"
        "print(json.dumps({m: u.find_spec(m) is not None for m in sys.argv[1:]}))"
    )
    serving = ("numpy", "onnx", "onnxruntime", "click", "fastapi", "uvicorn")
    found = lean.run(lean.python, "-c", code, *serving, *TRAINING_PACKAGES)
    assert found.returncode == 0, found.stderr
    installed = json.loads(found.stdout)
    assert [m for m in TRAINING_PACKAGES if installed[m]] == [], "training packages installed"
    assert [m for m in serving if not installed[m]] == [], "serving packages missing"


def test_predictor_answers_like_the_full_install(lean: LeanVenv, export_dir: Path) -> None:
    proc = lean.run(lean.python, "-c", PREDICT, export_dir, json.dumps(IDS), *TRAINING_PACKAGES)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert Path(got["package"]).is_relative_to(lean.root / "venv"), got["package"]
    assert got["training_modules"] == []
    want = Predictor(export_dir, device="cpu", threads=1).predict(IDS, return_embedding=True)
    assert got["classes"] == want.classes.tolist()
    np.testing.assert_allclose(got["scores"], want.scores, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["embedding"], want.embedding, rtol=1e-5, atol=1e-6)
    assert got["provider"] == "CPUExecutionProvider"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(port: int, path: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=data, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


def _vm_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def test_serve_answers_without_torch(
    lean: LeanVenv, export_dir: Path, record_property: Any
) -> None:
    # pip --no-compile left no bytecode: import once so the measured process finds it cached,
    # as in an image installed with pip's default (compiling in the server would inflate RSS).
    warm = lean.run(lean.python, "-c", "import abkd_deploy.cli, abkd_deploy.serve.server")
    assert warm.returncode == 0, warm.stderr
    port = _free_port()
    args = ["serve", export_dir, "--port", port, "--device", "cpu", "--threads", "1"]
    proc = subprocess.Popen(
        [str(lean.cli), *map(str, args)],
        cwd=lean.root,
        env=lean.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                status, health = _http(port, "/healthz")
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    pytest.fail(f"lean `abkd-deploy serve` did not start: {proc.communicate()[0]}")
                time.sleep(0.1)
        assert (status, health["status"]) == (200, "ok"), health
        want = Predictor(export_dir, device="cpu", threads=1).predict(IDS)
        for _ in range(20):
            status, body = _http(port, "/v1/predict", {"node_ids": IDS})
            assert status == 200, body
            assert body["predictions"] == want.classes.tolist()
            np.testing.assert_allclose(body["scores"], want.scores, rtol=1e-5, atol=1e-6)
        status, body = _http(port, "/v1/predict", {"node_ids": [10**6]})
        assert 400 <= status < 500 and "10" in json.dumps(body), (status, body)
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
        assert "torch" not in maps
        mem = {k: _vm_kib(proc.pid, k) for k in ("VmRSS", "RssAnon", "RssFile", "VmHWM")}
    finally:
        proc.terminate()
        out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, out
    record_property("lean_serve_rss_mib", round(mem["VmRSS"] / 1024, 1))
    print(
        "\nlean serving install: `abkd-deploy serve` (tiny embedded export, after 21 requests): "
        + ", ".join(f"{k} {v / 1024:.1f} MiB" for k, v in mem.items())
    )
    # RssFile (shared library pages) depends on the page cache; RssAnon is the process's own.
    assert 0 < mem["RssAnon"] <= mem["VmRSS"] < 1024**2, mem


def test_triton_repository_without_torch(lean: LeanVenv, export_dir: Path) -> None:
    repo = lean.root / "triton-repo"
    proc = lean.run(lean.cli, "triton", export_dir, "--out", repo, "--name", "tiny")
    assert proc.returncode == 0, proc.stderr
    config = (repo / "tiny" / "config.pbtxt").read_text()
    assert 'platform: "onnxruntime_onnx"' in config and "node_ids" in config
    assert (repo / "tiny" / "1" / "model.onnx").is_file()


@pytest.mark.parametrize(
    ("command", "args"), TRAINING_COMMANDS, ids=[c for c, _ in TRAINING_COMMANDS]
)
def test_training_commands_name_the_extra(
    lean: LeanVenv, export_dir: Path, command: str, args: list[str]
) -> None:
    run_dir = lean.root / "run"
    run_dir.mkdir(exist_ok=True)
    out = lean.root / f"out-{command}"
    subst = {"RUN": run_dir, "EXPORT": export_dir}
    proc = lean.run(lean.cli, command, *(subst.get(a, a) for a in args), "--out", out)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stderr.strip() == (
        f"error: 'abkd-deploy {command}' needs the training stack (torch is not installed); "
        'install it with pip install "abkd-deploy[train]"'
    )
    assert not out.exists()

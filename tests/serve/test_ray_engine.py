"""``serve --engine ray``: Ray Serve replicas behind the built-in server's HTTP API.

One local Ray instance (2 model replicas) serves the tiny export for the whole module,
started and stopped (SIGTERM) as ``abkd-deploy serve --engine ray``; the kill test runs
last because it replaces a replica.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import pytest
from click.testing import CliRunner

from abkd_deploy.cli import main
from abkd_deploy.serve import Predictor
from abkd_deploy.serve.server import create_app
from tests.serve.live_server import Client, LiveServer
from tests.serve.test_process import REPO, _free_port

HAVE_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(
    not HAVE_RAY, reason='Ray Serve is not installed (the ray extra: pip install ".[ray]")'
)


def live_ray(test: Callable[..., None]) -> Callable[..., None]:
    """Marks a test that runs against the live Ray instance (~40-70 s to start on 2 cores)."""
    return needs_ray(pytest.mark.slow(pytest.mark.timeout(600)(test)))


REPLICAS = 2
MAX_BATCH = 256
MAX_IDS = 64
CLIENTS = 16
STARTUP_S = 240


@dataclass
class RayServer:
    proc: subprocess.Popen
    port: int
    log: Path
    pids: set[int] = field(default_factory=set)  # every process Ray started for it

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def healthz(self) -> dict:
        with urllib.request.urlopen(self.url("/healthz"), timeout=10) as r:
            return json.load(r)

    def record_processes(self) -> None:
        self.pids |= {p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)}

    def model_pids(self, want: int, timeout_s: float = 120) -> set[int]:
        """Pids of the model replicas, as ``/healthz`` reports them (one per call, from
        whichever replica answers) until ``want`` distinct pids have been seen."""
        seen: set[int] = set()
        deadline = time.monotonic() + timeout_s
        while len(seen) < want and time.monotonic() < deadline:
            try:
                body = self.healthz()
                seen.add(body["pid"])
            except OSError:
                time.sleep(0.5)
        return seen


@pytest.fixture(scope="module")
def ray_server(embedded_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayServer]:
    port = _free_port()
    log = tmp_path_factory.mktemp("ray") / "serve.log"
    cmd = [
        sys.executable, "-m", "abkd_deploy.cli", "serve", str(embedded_dir), "--engine", "ray",
        "--replicas", str(REPLICAS), "--port", str(port), "--device", "cpu", "--threads", "1",
        "--max-batch", str(MAX_BATCH), "--max-ids", str(MAX_IDS), "--max-wait-ms", "2",
    ]  # fmt: skip
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    server = RayServer(proc, port, log)
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            try:
                if server.healthz()["status"] == "ok":
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Ray Serve did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        server.record_processes()
        yield server
    finally:
        if proc.poll() is None:
            server.record_processes()
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait(30)
        _kill_leftovers(server.pids)
    assert rc == 0, log.read_text()[-3000:]
    assert "abkd-deploy serve: stopped" in log.read_text()


def _kill_leftovers(pids: set[int], grace_s: float = 30) -> None:
    """Fails (after killing them) if any of Ray's processes outlived ``serve``."""
    deadline = time.monotonic() + grace_s
    alive = [p for p in pids if psutil.pid_exists(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.5)
        alive = [p for p in alive if _running(p)]
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    assert not alive, f"Ray processes left behind after serve stopped: {alive}"


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture(scope="module")
def predictor(embedded_dir: Path) -> Predictor:
    return Predictor(embedded_dir, device="cpu", threads=1, max_batch=MAX_BATCH)


def _check_answer(body: dict, ids: np.ndarray, predictor: Predictor) -> bool:
    want = predictor.predict(ids, return_embedding=True)
    return (
        body["predictions"] == want.classes.tolist()
        and np.allclose(body["scores"], want.scores, rtol=1e-5, atol=1e-6)
        and np.allclose(body["embeddings"], want.embedding, rtol=1e-5, atol=1e-6)
    )


@live_ray
def test_healthz_reports_ray(ray_server: RayServer) -> None:
    body = ray_server.healthz()
    assert (body["engine"], body["replicas"]) == ("ray", REPLICAS)
    assert (body["max_batch"], body["max_ids_per_request"]) == (MAX_BATCH, MAX_IDS)
    assert body["provider"] == "CPUExecutionProvider" and body["num_nodes"] == 500


@live_ray
def test_answers_equal_predictor(ray_server: RayServer, predictor: Predictor) -> None:
    per_client = 1000 // CLIENTS + 1  # 16 * 63 = 1,008 requests
    errors: list[str] = []
    answered = [0]
    lock = threading.Lock()

    def client_loop(seed: int) -> None:
        rng = np.random.default_rng(seed)
        c = Client(ray_server.port)
        try:
            for _ in range(per_client):
                ids = rng.integers(0, predictor.num_nodes, size=rng.integers(1, MAX_IDS + 1))
                status, body = c.predict(ids.tolist(), return_embedding=True)
                ok = status == 200 and _check_answer(body, ids, predictor)
                with lock:
                    answered[0] += ok
                    if not ok:
                        errors.append(f"{status} {str(body)[:200]} for {ids.tolist()[:8]}")
        except Exception as exc:
            with lock:
                errors.append(f"client {seed}: {type(exc).__name__}: {exc}")
        finally:
            c.close()

    threads = [threading.Thread(target=client_loop, args=(s,)) for s in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors[:5]
    assert answered[0] == CLIENTS * per_client >= 1000


# Requests that must get the same status and JSON error body from both engines.
BAD_REQUESTS = [
    ("POST", "/v1/predict", b"{not json"),
    ("POST", "/v1/predict", b""),
    ("POST", "/v1/predict", b'{"node_ids": [1, NaN]}'),
    ("POST", "/v1/predict", b"[1, 2]"),
    ("POST", "/v1/predict", b'{"ids": [1]}'),
    ("POST", "/v1/predict", b'{"node_ids": [1], "return_embedding": "yes"}'),
    ("POST", "/v1/predict", b'{"node_ids": [1], "format": "xml"}'),
    ("POST", "/v1/predict", b'{"node_ids": []}'),
    ("POST", "/v1/predict", b'{"node_ids": "1,2"}'),
    ("POST", "/v1/predict", b'{"node_ids": [1, 2.5, "x", null]}'),
    ("POST", "/v1/predict", b'{"node_ids": [1, -3, 500, 7]}'),
    ("POST", "/v1/predict", b'{"node_ids": [' + b",".join(b"1" for _ in range(65)) + b"]}"),
    ("POST", "/v1/predict", b" " * 200_000),
    ("GET", "/v1/predict", None),
    ("GET", "/nowhere", None),
]


@live_ray
def test_error_parity_with_builtin(ray_server: RayServer, predictor: Predictor) -> None:
    app = create_app(predictor, max_batch=MAX_BATCH, max_wait_ms=2, max_ids_per_request=MAX_IDS)
    with LiveServer(app) as builtin:
        for method, path, body in BAD_REQUESTS:
            answers = []
            for port in (builtin.port, ray_server.port):
                c = Client(port)
                try:
                    answers.append(c.request(method, path, body, raw=True)[:2])
                finally:
                    c.close()
            (b_status, b_body), (r_status, r_body) = answers
            assert b_status >= 400 and b_body["error"]["code"], (path, body)
            assert (r_status, r_body) == (b_status, b_body), (method, path, (body or b"")[:40])


@live_ray
def test_top1_and_binary_answers(ray_server: RayServer, predictor: Predictor) -> None:
    from abkd_deploy.serve.wire import decode_binary

    c = Client(ray_server.port)
    try:
        status, body = c.predict([3, 1, 4], format="top1")
        assert status == 200 and body == {
            "predictions": predictor.predict([3, 1, 4]).classes.tolist()
        }
        c.conn.request(
            "POST", "/v1/predict", body=b'{"node_ids": [5, 9]}',
            headers={"Accept": "application/octet-stream"},
        )  # fmt: skip
        resp = c.conn.getresponse()
        got = decode_binary(resp.read())
        np.testing.assert_array_equal(got["predictions"], predictor.predict([5, 9]).classes)
    finally:
        c.close()


@live_ray
def test_killed_replica_is_replaced(ray_server: RayServer, predictor: Predictor) -> None:
    before = ray_server.model_pids(REPLICAS)
    assert len(before) == REPLICAS, f"saw model replicas {before}"
    victim = min(before)
    stop = threading.Event()
    lock = threading.Lock()
    ok, failures, wrong = [0], [], []

    def client_loop(seed: int) -> None:
        rng = np.random.default_rng(100 + seed)
        c = Client(ray_server.port)
        while not stop.is_set():
            ids = rng.integers(0, predictor.num_nodes, size=rng.integers(1, MAX_IDS + 1))
            try:
                status, body = c.predict(ids.tolist(), return_embedding=True)
            except OSError as exc:  # a connection error is an acceptable, clear failure
                with lock:
                    failures.append(f"connection: {type(exc).__name__}")
                c.close()
                c = Client(ray_server.port)
                continue
            with lock:
                if status == 200:
                    ok[0] += 1
                    if not _check_answer(body, ids, predictor):
                        wrong.append(ids.tolist())
                else:
                    failures.append((status, body))
        c.close()

    threads = [threading.Thread(target=client_loop, args=(s,)) for s in range(CLIENTS)]
    for t in threads:
        t.start()
    try:
        while ok[0] < 100 and all(t.is_alive() for t in threads):
            time.sleep(0.05)
        os.kill(victim, signal.SIGKILL)
        killed_at = ok[0]
        time.sleep(5)  # load goes on while Ray notices and starts a replacement
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    print(f"\n{ok[0]} answered ({killed_at} before the kill), {len(failures)} failed: {failures}")
    assert not wrong, wrong[:3]
    assert ok[0] > killed_at, "no request succeeded after the replica was killed"
    # only requests in flight on the killed replica may fail, each with a clear error
    assert len(failures) <= CLIENTS, failures[:5]
    for failure in failures:
        if isinstance(failure, tuple):
            status, body = failure
            assert status == 503 and body["error"]["code"] in ("replica_failed", "unavailable")
            assert body["error"]["message"]
    # Ray replaces the replica: two healthy model replicas again, the victim not among them
    deadline = time.monotonic() + STARTUP_S
    after: set[int] = set()
    while time.monotonic() < deadline:
        after = ray_server.model_pids(REPLICAS, timeout_s=30)
        if len(after) == REPLICAS and victim not in after:
            break
        time.sleep(1)
    assert len(after) == REPLICAS and victim not in after, (before, after)
    ray_server.record_processes()
    status, body = Client(ray_server.port).predict([1, 2])
    assert status == 200 and body["predictions"] == predictor.predict([1, 2]).classes.tolist()


# --------------------------------------------------------------- without a Ray instance


def test_missing_ray_is_one_line_naming_the_extra(
    embedded_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    result = CliRunner().invoke(main, ["serve", str(embedded_dir), "--engine", "ray"])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --engine ray needs Ray Serve")
    assert 'pip install "abkd-deploy[ray]"' in lines[0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--engine", "ray", "--workers", "2"], "--workers is for --engine builtin"),
        (["--replicas", "2"], "--replicas and --ray-address need --engine ray"),
    ],
)
def test_engine_option_mixups(embedded_dir: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, ["serve", str(embedded_dir), *args])
    assert result.exit_code == 2 and message in result.output, result.output


class _FakeMethod:
    """``handle.method.remote(...)``: each call takes the next outcome (an exception to
    raise, or a function of the call's argument)."""

    def __init__(self, *outcomes: object) -> None:
        self.outcomes = list(outcomes)
        self.calls = 0

    def remote(self, *args: object) -> object:
        self.calls += 1
        outcome = self.outcomes.pop(0)

        async def answer() -> object:
            if isinstance(outcome, BaseException):
                raise outcome
            return outcome(*args)

        return answer()


class _FakeModel:
    def __init__(self, predict: _FakeMethod) -> None:
        self.predict = predict
        self.info = _FakeMethod(lambda: {"pid": 1})


def _front_client(predictor: Predictor, model: _FakeModel):  # -> TestClient
    from fastapi.testclient import TestClient

    from abkd_deploy.serve.ray_engine import FrontSettings, build_http_app

    front = FrontSettings(2, MAX_BATCH, 2.0, MAX_IDS, 10.0)
    return TestClient(build_http_app(model, predictor.num_nodes, predictor.has_embedding, front))


def _run(predictor: Predictor):
    return lambda item: predictor.predict(item[0], return_embedding=item[1])


@needs_ray
def test_front_retries_once_when_the_replica_dies(predictor: Predictor) -> None:
    from ray.exceptions import ActorDiedError

    model = _FakeModel(_FakeMethod(ActorDiedError(), _run(predictor)))
    response = _front_client(predictor, model).post("/v1/predict", json={"node_ids": [4, 2]})
    assert response.status_code == 200
    assert response.json()["predictions"] == predictor.predict([4, 2]).classes.tolist()
    assert model.predict.calls == 2


@needs_ray
def test_front_answers_json_503_when_the_retry_fails_too(predictor: Predictor) -> None:
    from ray.exceptions import ActorDiedError, ActorUnavailableError

    died = ActorUnavailableError("replica unreachable", None)
    model = _FakeModel(_FakeMethod(ActorDiedError(), died))
    response = _front_client(predictor, model).post("/v1/predict", json={"node_ids": [4]})
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "replica_failed" and "ActorUnavailableError" in error["message"]


@needs_ray
def test_front_answers_json_503_under_back_pressure(predictor: Predictor) -> None:
    from ray.serve.exceptions import BackPressureError

    full = BackPressureError(num_queued_requests=5, max_queued_requests=5)
    model = _FakeModel(_FakeMethod(full))
    response = _front_client(predictor, model).post("/v1/predict", json={"node_ids": [4]})
    assert response.status_code == 503 and response.json()["error"]["code"] == "unavailable"
    assert "backpressure" in response.json()["error"]["message"]


@pytest.fixture(scope="module")
def new_node_predictor(tmp_path_factory: pytest.TempPathFactory) -> Predictor:
    """A real embedded gcn export, which carries new_nodes.onnx."""
    from abkd_deploy.export import export
    from tests.export.conftest import make_run

    tmp = tmp_path_factory.mktemp("ray_new_nodes")
    run = make_run(tmp / "run", "gcn", epochs=3)
    export(run, tmp / "export", fanouts="3,3", progress=False)
    return Predictor(tmp / "export", device="cpu", threads=1, max_batch=MAX_BATCH)


@needs_ray
def test_front_answers_new_nodes_like_the_builtin_server(new_node_predictor: Predictor) -> None:
    from fastapi.testclient import TestClient

    from abkd_deploy.serve.ray_engine import FrontSettings, build_http_app

    p = new_node_predictor
    model = _FakeModel(_FakeMethod(_run(p)))
    model.predict_nodes = _FakeMethod(lambda item: p.predict_nodes(item[0], item[1]))
    front = FrontSettings(2, MAX_BATCH, 2.0, MAX_IDS, 10.0)
    app = build_http_app(model, p.num_nodes, p.has_embedding, front, p.new_nodes.limits)
    width = p.new_nodes.limits.feature_width
    nodes = [
        {"features": [0.5] * width, "neighbors": [1, 2]},
        {"features": [0.0] * width, "neighbors": []},
    ]
    client = TestClient(app)
    response = client.post("/v1/predict", json={"node_ids": [4], "nodes": nodes})
    assert response.status_code == 200, response.text
    want = p.predict([4], nodes=nodes)
    assert response.json()["predictions"] == want.classes.tolist()
    np.testing.assert_allclose(response.json()["scores"], want.scores, atol=1e-6)
    assert model.predict.calls == 1 and model.predict_nodes.calls == 1
    bad = client.post("/v1/predict", json={"nodes": [{"features": [1.0], "neighbors": []}]})
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_nodes"

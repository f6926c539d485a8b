"""Model directories REPO/<model>/<version>/: version choice, validation, rollback, hot swap."""

from __future__ import annotations

import asyncio
import logging
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from abkd_deploy import model_repo
from abkd_deploy.errors import ServeError
from abkd_deploy.model_repo import list_versions, next_version, publish_version, write_version
from abkd_deploy.serve import Prediction, Predictor
from abkd_deploy.serve.batcher import MicroBatcher
from abkd_deploy.serve.metrics import ServeMetrics
from abkd_deploy.serve.server import AppSettings
from abkd_deploy.serve.versions import ModelVersions, VersionMetrics, VersionWatcher
from tests.serve.live_server import LiveServer
from tests.serve.tiny_export import TinyModel, make_tiny, write_embedded

NUM_NODES = 300


def _load(path: Path) -> Predictor:
    return Predictor(path, device="cpu", threads=1, max_batch=512)


def _tamper(export: Path) -> Path:
    """Flips one byte of model.onnx (same size): only the SHA-256 check can notice."""
    model = export / "model.onnx"
    data = bytearray(model.read_bytes())
    data[-5] ^= 0xFF
    model.write_bytes(bytes(data))
    return export


def publish(model_dir: Path, tiny: TinyModel, broken: bool = False) -> int:
    """Publishes ``tiny`` as the next version, the way ``export --repo`` does."""

    def write(out: Path) -> Path:
        write_embedded(out, tiny)
        return _tamper(out) if broken else out

    return write_version(model_dir, write)[0]


def _watcher(model_dir: Path) -> tuple[VersionWatcher, ServeMetrics]:
    metrics = ServeMetrics()
    return VersionWatcher(model_dir, _load, VersionMetrics(metrics)), metrics


def _metric(text: str, series: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return None


@pytest.fixture(scope="module")
def tinies() -> list[TinyModel]:
    """Three models with different weights (and answers) on the same 300-node graph."""
    return [make_tiny(num_nodes=NUM_NODES, seed=s) for s in (11, 12, 13)]


def test_versions_ignore_hidden_staging_and_non_integer_entries(tmp_path: Path) -> None:
    for name in ("1", "3", "10", ".4.123.tmp", ".11", "abc", "07", "-2", "v5", "2.0"):
        (tmp_path / name).mkdir()
    (tmp_path / "12").write_text("a file, not a folder")
    assert list_versions(tmp_path) == [1, 3, 10]
    assert next_version(tmp_path) == 11
    assert next_version(tmp_path / "missing") == 1
    assert model_repo.is_model_dir(tmp_path)
    (tmp_path / "manifest.json").write_text("{}")
    assert not model_repo.is_model_dir(tmp_path)  # an export directory


def test_newest_valid_version_is_served(tmp_path: Path, tinies: list[TinyModel]) -> None:
    model_dir = tmp_path / "m"
    assert [publish(model_dir, t) for t in tinies[:2]] == [1, 2]
    # newer-looking entries that are not versions: never read
    write_embedded(model_dir / ".9.4242.abcd.tmp", tinies[2])
    write_embedded(model_dir / "latest", tinies[2])
    write_embedded(model_dir / "010", tinies[2])
    watcher, _ = _watcher(model_dir)
    served = watcher.initial()
    assert served.version == 2 and served.path == model_dir / "2"
    ids = np.arange(NUM_NODES)
    np.testing.assert_array_equal(
        served.predictor.predict(ids).classes, tinies[1].forward(ids)[0].argmax(1)
    )
    assert watcher.scan(served) is None  # nothing new


def test_broken_version_is_never_served_and_is_reported(
    tmp_path: Path, tinies: list[TinyModel], caplog: pytest.LogCaptureFixture
) -> None:
    model_dir = tmp_path / "m"
    publish(model_dir, tinies[0])
    publish(model_dir, tinies[1], broken=True)
    watcher, metrics = _watcher(model_dir)
    with caplog.at_level(logging.ERROR, "abkd_deploy.serve.versions"):
        served = watcher.initial()
    assert served.version == 1
    assert "model version 2" in caplog.text and "sha256" in caplog.text.lower()
    fail = 'abkd_serve_model_load_failures_total{version="2"}'
    assert _metric(metrics.render(), fail) == 1.0
    assert watcher.scan(served) is None and watcher.scan(served) is None
    assert _metric(metrics.render(), fail) == 1.0  # tried once, not on every scan
    assert publish(model_dir, tinies[2], broken=True) == 3
    assert watcher.scan(served) is None
    assert _metric(metrics.render(), 'abkd_serve_model_load_failures_total{version="3"}') == 1.0
    assert publish(model_dir, tinies[2]) == 4
    new = watcher.scan(served)
    assert new is not None and new.version == 4
    # a model whose answers differ in shape is refused too
    publish(model_dir, make_tiny(num_nodes=NUM_NODES, classes=3, seed=5))
    assert watcher.scan(new) is None
    assert "num_classes 3 (served: 4)" in watcher.failed[5][1]


def test_no_valid_version_is_a_startup_error(tmp_path: Path, tinies: list[TinyModel]) -> None:
    model_dir = tmp_path / "m"
    publish(model_dir, tinies[0], broken=True)
    with pytest.raises(ServeError, match=r"no valid version in model directory .*1: .*sha256"):
        _watcher(model_dir)[0].initial()


def test_removing_the_newest_version_rolls_back(
    tmp_path: Path, tinies: list[TinyModel], caplog: pytest.LogCaptureFixture
) -> None:
    model_dir = tmp_path / "m"
    for t in tinies:
        publish(model_dir, t)
    watcher, _ = _watcher(model_dir)
    served = watcher.initial()
    assert served.version == 3
    shutil.rmtree(model_dir / "3")
    back = watcher.scan(served)
    assert back is not None and back.version == 2
    ids = np.arange(NUM_NODES)
    np.testing.assert_allclose(
        back.predictor.predict(ids).scores.argmax(1), tinies[1].forward(ids)[0].argmax(1)
    )
    # the folder of the served version replaced by other content: reloaded
    shutil.rmtree(model_dir / "2")
    write_embedded(model_dir / "2", tinies[2])
    again = watcher.scan(back)
    assert again is not None and again.version == 2 and again.fingerprint != back.fingerprint
    # nothing valid left: keep serving from memory, say so once
    shutil.rmtree(model_dir / "2")
    shutil.rmtree(model_dir / "1")
    with caplog.at_level(logging.ERROR, "abkd_deploy.serve.versions"):
        assert watcher.scan(again) is None and watcher.scan(again) is None
    assert caplog.text.count("no valid version left") == 1
    assert len(again.predictor.predict([0, 1])) == 2


def test_publish_retries_when_the_number_is_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_dir = tmp_path / "m"
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "1" / "keep").write_text("someone else's version 1")
    staged = model_dir / ".staged"
    staged.mkdir()
    (staged / "mine").write_text("x")
    real = model_repo.next_version
    stale = iter([1])  # a racing publisher computed 1 before version 1 appeared
    monkeypatch.setattr(model_repo, "next_version", lambda d: next(stale, None) or real(d))
    assert publish_version(model_dir, staged) == (2, model_dir / "2")
    assert (model_dir / "1" / "keep").read_text() == "someone else's version 1"
    assert (model_dir / "2" / "mine").read_text() == "x" and not staged.exists()


def test_concurrent_publishers_get_distinct_versions(tmp_path: Path) -> None:
    model_dir = tmp_path / "m"
    got: list[int] = []
    barrier = threading.Barrier(8)

    def one(i: int) -> None:
        def write(out: Path) -> None:
            out.mkdir()
            (out / "who").write_text(str(i))
            barrier.wait()  # everyone publishes at once

        got.append(write_version(model_dir, write)[0])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == list(range(1, 9)) == list_versions(model_dir)
    assert sorted(int((model_dir / str(v) / "who").read_text()) for v in got) == list(range(8))
    assert [p.name for p in model_dir.iterdir() if p.name.startswith(".")] == []


def test_failed_write_leaves_no_version(tmp_path: Path) -> None:
    model_dir = tmp_path / "m"

    def write(out: Path) -> None:
        out.mkdir()
        (out / "half").write_text("x")
        raise RuntimeError("export failed")

    with pytest.raises(RuntimeError, match="export failed"):
        write_version(model_dir, write)
    assert list(model_dir.iterdir()) == []


def test_request_racing_a_swap_goes_to_the_new_version(
    tmp_path: Path, tinies: list[TinyModel]
) -> None:
    """A request that read the old version but reached its batcher after the swap closed
    it is checked again and answered wholly by the new version (not a 503)."""
    model_dir = tmp_path / "m"
    publish(model_dir, tinies[0])
    watcher, _ = _watcher(model_dir)
    versions = ModelVersions(watcher.initial(), watcher, poll_s=60)
    versions.start(lambda p: MicroBatcher(p.predict, 64, 1.0))
    old = versions.current
    publish(model_dir, tinies[1])
    parsed = []

    def parse(served):
        parsed.append(served.version)
        if len(parsed) == 1:
            assert versions.check_now()  # the swap lands between parse and queueing
        return np.array([4, 2])

    async def run(served, ids):
        return await served.batcher.apredict(ids)

    served, _, pred = asyncio.run(versions.apredict(parse, run))
    versions.close()
    assert parsed == [1, 2] and served.version == 2 and old.batcher.closed
    np.testing.assert_array_equal(pred.classes, tinies[1].forward(np.array([4, 2]))[0].argmax(1))


def _reference(export: Path) -> Prediction:
    """Every node's answer of one export, straight from the Predictor."""
    return _load(export).predict(np.arange(NUM_NODES))


def _wait_for(check, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_http_model_version_metrics_and_rollback(tmp_path: Path, tinies: list[TinyModel]) -> None:
    model_dir = tmp_path / "m"
    publish(model_dir, tinies[0])
    publish(model_dir, tinies[0], broken=True)
    shutil.move(model_dir / "2", model_dir / "9")  # broken at startup: counted too
    settings = AppSettings(str(model_dir), device="cpu", threads=1, max_batch=64, poll_s=0.05)
    with LiveServer(settings.build()) as live:
        c = live.connect()
        text = c.request("GET", "/metrics")[1]
        assert 'abkd_serve_model_load_failures_total{version="9"} 1.0' in text
        assert 'abkd_serve_model_loads_total{version="1"} 1.0' in text
        shutil.rmtree(model_dir / "9")
        status, body, headers = c.request("POST", "/v1/predict", {"node_ids": [3, 1]})
        assert status == 200 and body["model_version"] == 1
        assert headers["x-model-version"] == "1"
        status, health, _ = c.request("GET", "/healthz")
        assert health["model_version"] == 1
        publish(model_dir, tinies[1], broken=True)

        def metrics() -> str:
            return c.request("GET", "/metrics")[1]

        _wait_for(lambda: 'abkd_serve_model_load_failures_total{version="2"} 1.0' in metrics())
        assert c.predict([5])[1]["model_version"] == 1
        publish(model_dir, tinies[2])
        _wait_for(lambda: c.predict([5])[1]["model_version"] == 3)
        text = metrics()
        assert _metric(text, "abkd_serve_model_version") == 3.0
        assert _metric(text, 'abkd_serve_model_requests_total{model_version="1"}') >= 2
        assert _metric(text, 'abkd_serve_model_loads_total{version="3"}') == 1.0
        shutil.rmtree(model_dir / "3")  # rollback past the broken 2, to 1
        _wait_for(lambda: c.predict([5])[1]["model_version"] == 1)
        ref = _reference(model_dir / "1")
        status, body = c.predict([7, 8])
        assert body["predictions"] == ref.classes[[7, 8]].tolist()
        c.close()


CLIENTS = 32
PER_CLIENT = 63  # 32 * 63 = 2,016 requests


def test_hot_swap_under_load(tmp_path: Path, tinies: list[TinyModel]) -> None:
    """2,016 requests from 32 keep-alive clients while versions 2 (good), 3 (broken) and
    4 (good) are published: no failure, every answer equal to its version's own answer."""
    model_dir = tmp_path / "m"
    publish(model_dir, tinies[0])
    # the answers of the versions to come, computed alone from exports like theirs
    refs = {}
    for version, tiny in ((2, tinies[1]), (4, tinies[2])):
        refs[version] = _reference(write_embedded(tmp_path / f"alone{version}", tiny))
    refs[1] = _reference(model_dir / "1")
    assert not np.array_equal(refs[1].classes, refs[2].classes)
    assert not np.array_equal(refs[2].classes, refs[4].classes)

    settings = AppSettings(str(model_dir), device="cpu", threads=1, max_batch=64, poll_s=0.05)
    done = [0]
    lock = threading.Lock()
    failures: list[str] = []
    mismatches: list[str] = []
    seen: dict[int, int] = {}
    monotone: list[bool] = []
    barrier = threading.Barrier(CLIENTS + 1)

    def client(seed: int, live: LiveServer) -> None:
        rng = np.random.default_rng(seed)
        c = live.connect()
        barrier.wait()
        versions = []
        for _ in range(PER_CLIENT):
            ids = rng.integers(0, NUM_NODES, size=int(rng.integers(1, 17)))
            try:
                status, body = c.predict(ids.tolist())
            except Exception as exc:
                status, body = -1, repr(exc)
            with lock:
                done[0] += 1
                if status != 200:
                    failures.append(f"{status} {body}")
                    continue
                version = body["model_version"]
                versions.append(version)
                seen[version] = seen.get(version, 0) + 1
                ref = refs.get(version)
                if ref is None or not (
                    body["predictions"] == ref.classes[ids].tolist()
                    and np.allclose(body["scores"], ref.scores[ids], rtol=1e-5, atol=1e-6)
                ):
                    mismatches.append(f"version {version} ids {ids.tolist()}")
        monotone.append(versions == sorted(versions))
        c.close()

    def publisher() -> None:
        barrier.wait()
        for at, tiny, broken in ((300, tinies[1], False), (800, tinies[2], True)):
            _wait_for(lambda at=at: done[0] >= at, 60)
            publish(model_dir, tiny, broken)
        _wait_for(lambda: done[0] >= 1100, 60)
        publish(model_dir, tinies[2])

    start = time.monotonic()
    with LiveServer(settings.build()) as live:
        threads = [threading.Thread(target=client, args=(i, live)) for i in range(CLIENTS)]
        threads.append(threading.Thread(target=publisher))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        c = live.connect()
        text = c.request("GET", "/metrics")[1]
        c.close()
    elapsed = time.monotonic() - start
    print(f"hot swap under load: {done[0]} requests in {elapsed:.1f} s, by version {seen}")
    assert failures == [] and mismatches == []
    assert done[0] == CLIENTS * PER_CLIENT
    assert set(seen) == {1, 2, 4}  # the broken version 3 never answered
    assert all(monotone)  # no client saw an older version after a newer one
    assert _metric(text, 'abkd_serve_model_load_failures_total{version="3"}') == 1.0
    assert _metric(text, "abkd_serve_model_version") == 4.0
    total = sum(
        _metric(text, f'abkd_serve_model_requests_total{{model_version="{v}"}}') for v in seen
    )
    assert total == CLIENTS * PER_CLIENT


def test_cli_serve_model_dir_refusals(tmp_path: Path, tinies: list[TinyModel]) -> None:
    from click.testing import CliRunner

    from abkd_deploy.cli import main

    model_dir = tmp_path / "m"
    publish(model_dir, tinies[0], broken=True)
    runner = CliRunner()
    res = runner.invoke(main, ["serve", str(model_dir), "--port", "0", "--device", "cpu"])
    assert res.exit_code == 1 and "no valid version in model directory" in res.output
    res = runner.invoke(main, ["serve", str(model_dir), "--engine", "ray"])
    assert res.exit_code == 2 and "needs --engine builtin" in res.output
    res = runner.invoke(main, ["serve", str(model_dir), "--poll-s", "0"])
    assert res.exit_code == 2 and "--poll-s" in res.output

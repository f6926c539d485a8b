"""Load test: >= 2,000 requests from >= 32 concurrent keep-alive clients, all checked."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np

from abkd_deploy.serve import Prediction, Predictor
from abkd_deploy.serve.server import create_app
from tests.serve.live_server import LiveServer

CLIENTS = 40
VALID_PER_CLIENT = 52  # 40 * 52 = 2,080 valid requests
INVALID_EVERY = 8  # plus one invalid request after every 8 valid ones
MAX_IDS = 32

# (raw body, expected status, expected error code)
INVALID = [
    (b'{"node_ids": [1, 2', 400, "malformed_json"),
    (b'{"node_ids": [3, -1, 500]}', 422, "invalid_node_ids"),
    (b'{"node_ids": [1, 2.5]}', 422, "invalid_node_ids"),
    (b'{"node_ids": []}', 422, "invalid_node_ids"),
    (b'{"node_ids": [' + b",".join(b"7" for _ in range(MAX_IDS + 1)) + b"]}", 413, "too_many_ids"),
]


def _metric(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return 0.0


def test_load(embedded_dir: Path) -> None:
    predictor = Predictor(embedded_dir, device="cpu", threads=1, max_batch=256)
    # the reference: every node's answer, straight from the Predictor
    chunks = [predictor.predict(c) for c in np.array_split(np.arange(predictor.num_nodes), 4)]
    ref = Prediction(
        np.concatenate([c.classes for c in chunks]), np.concatenate([c.scores for c in chunks])
    )
    app = create_app(predictor, max_batch=128, max_wait_ms=2, max_ids_per_request=MAX_IDS)

    errors: list[str] = []
    mismatches: list[str] = []
    counts = {"valid": 0, "invalid": 0, "ids": 0}
    invalid_status: dict[int, int] = {}
    lock = threading.Lock()
    start_barrier = threading.Barrier(CLIENTS)

    def client_loop(seed: int, live: LiveServer) -> None:
        rng = np.random.default_rng(seed)
        c = live.connect()
        start_barrier.wait()
        try:
            for i in range(VALID_PER_CLIENT):
                ids = rng.integers(0, predictor.num_nodes, size=rng.integers(1, MAX_IDS + 1))
                status, body = c.predict(ids.tolist())
                if status != 200:
                    with lock:
                        errors.append(f"client {seed}: {status} {body}")
                    continue
                ok = body["predictions"] == ref.classes[ids].tolist() and np.allclose(
                    body["scores"], ref.scores[ids], rtol=1e-5, atol=1e-6
                )
                with lock:
                    counts["valid"] += 1
                    counts["ids"] += ids.size
                    if not ok:
                        mismatches.append(f"client {seed} request {i}: ids {ids.tolist()}")
                if i % INVALID_EVERY == INVALID_EVERY - 1:
                    raw, want_status, want_code = INVALID[(seed + i) % len(INVALID)]
                    status, payload, _ = c.request("POST", "/v1/predict", raw, raw=True)
                    with lock:
                        counts["invalid"] += 1
                        invalid_status[status] = invalid_status.get(status, 0) + 1
                        if status != want_status or payload["error"]["code"] != want_code:
                            errors.append(f"invalid request {raw[:40]!r}: got {status} {payload}")
        except Exception as exc:  # any transport error is a failure
            with lock:
                errors.append(f"client {seed}: {type(exc).__name__}: {exc}")
        finally:
            c.close()

    with LiveServer(app) as live:
        threads = [threading.Thread(target=client_loop, args=(s, live)) for s in range(CLIENTS)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        elapsed = time.perf_counter() - t0
        m = live.connect()
        metrics = m.request("GET", "/metrics")[1]
        m.close()

    assert not errors, errors[:5]
    assert not mismatches, mismatches[:5]
    assert counts["valid"] == CLIENTS * VALID_PER_CLIENT >= 2000
    assert counts["invalid"] >= 200
    print(
        f"\n{counts['valid'] + counts['invalid']} requests in {elapsed:.1f} s "
        f"from {CLIENTS} clients; invalid answered {invalid_status}"
    )
    # the server's own counts agree; micro-batching grouped requests
    assert _metric(metrics, 'abkd_serve_requests_total{code="200"}') == counts["valid"]
    n_errors = sum(
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("abkd_serve_errors_total{")
    )
    assert n_errors == counts["invalid"]
    assert _metric(metrics, "abkd_serve_node_ids_total") == counts["ids"]
    runs = _metric(metrics, "abkd_serve_batch_size_count")
    assert runs < counts["valid"], "no request was micro-batched with another"

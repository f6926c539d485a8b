"""``bench --http``: what clients of ``abkd-deploy serve`` see, next to a bare-app floor.

Protocol:

* Targets: ``serve`` (``abkd-deploy serve EXPORT`` started as a subprocess with the options
  a user would pass, on a free loopback port) and ``floor`` (:mod:`.bench_floor`: a bare
  FastAPI app answering, for a request of ``b`` ids, a body that ``serve`` sent for ``b``
  ids; same uvicorn settings and worker count). Both run during the whole measurement.
* Before timing, one request per batch size is sent to ``serve`` and its answer compared
  with :class:`~abkd_deploy.serve.predictor.Predictor` (classes equal, scores within 1e-5).
* Load (:mod:`.bench_client`): closed-loop clients in separate processes, one keep-alive
  connection per concurrent client, prebuilt requests of the bench's request batches
  (``{"node_ids": [...]}``). Per cell (target, concurrency, batch size) and trial:
  ``warmup`` untimed requests per connection, then ``requests`` timed requests (all
  connections together; a connection stops after ``trial_seconds``). Trials of ``serve``
  and ``floor`` alternate, so a change of the machine's load hits both.
* Per trial: p50/p99/mean latency over that trial's requests and requests/s (completed
  requests / wall time); reported values are medians over trials, the lists are kept for
  the regression gate. The client's own cost is its CPU time per request; its ceiling is
  ``client processes / CPU time per request`` requests/s (on fewer cores than client plus
  server processes, the two compete: the report says so).
* Afterwards both servers get SIGTERM; the report records their exit status, any process
  left in their process groups, and whether the port is free again.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from abkd_deploy.errors import AbkdError, ConfigError
from abkd_deploy.serve.bench_client import ClientPool, LoadJob, TrialResult

TARGETS = ("serve", "floor")
#: Scores of ``serve`` may differ this much from an in-process Predictor call.
SCORE_TOLERANCE = 1e-5
#: Seconds the rest of a server's process group may take to exit after its leader
#: (multiprocessing's resource tracker of ``--workers`` exits just after the parent).
LINGER_S = 5.0
#: A percentile resting on fewer requests per trial than this gets a warning.
MIN_SAMPLES = 20


@dataclass(frozen=True)
class HttpOptions:
    """Settings of ``bench --http``.

    Attributes:
        concurrency: concurrent closed-loop clients (connections) per cell.
        batch_sizes: node ids per request.
        requests: timed requests per trial and cell (all connections together).
        workers: server processes of ``serve`` and of the floor app (``--workers``).
        client_processes: processes the client connections are spread over.
        http: HTTP parser of both servers (``auto``: httptools when installed).
        startup_timeout_s: how long a server may take to answer ``/healthz``.
    """

    concurrency: tuple[int, ...] = (1, 8, 32)
    batch_sizes: tuple[int, ...] = (1, 64)
    requests: int = 1000
    workers: int = 1
    client_processes: int = 1
    http: str = "auto"
    startup_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        for name in ("concurrency", "batch_sizes"):
            values = getattr(self, name)
            if not values or min(values) < 1:
                raise ConfigError(f"HTTP {name} {list(values)}; expected positive integers")
        for name in ("requests", "workers", "client_processes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"HTTP {name} must be >= 1, got {getattr(self, name)}")


@dataclass
class ServerProcess:
    """A server started by the bench (its own process group)."""

    name: str
    command: list[str]
    port: int
    proc: subprocess.Popen
    log_path: Path
    stopped: dict[str, Any] = field(default_factory=dict)
    terminated: bool = False

    def terminate(self) -> None:
        """SIGTERM, once: a second one would cut the graceful drain short."""
        if not self.terminated and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.terminated = True

    def rss_mb(self) -> dict[str, float]:
        """Resident memory of each live process of the server's group (``{pid: MB}``)."""
        rss = {str(pid): _rss_mb(pid) for pid in group_pids(self.proc.pid)}
        return {pid: mb for pid, mb in rss.items() if mb is not None}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int) -> bool:
    """Whether nothing accepts connections on ``127.0.0.1:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) != 0


def group_pids(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group ``pgid``, from ``/proc``."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path("/proc", entry, "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # state ppid pgrp ...
        if fields[0] != "Z" and int(fields[2]) == pgid:
            out.append(int(entry))
    return sorted(out)


def _rss_mb(pid: int) -> float | None:
    try:
        for line in Path("/proc", str(pid), "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def _get(port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def launch(name: str, command: list[str], port: int, log_dir: Path) -> ServerProcess:
    """Starts ``command`` in a new process group, its output in ``log_dir/<name>.log``."""
    log_path = log_dir / f"{name}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    return ServerProcess(name, command, port, proc, log_path)


def wait_ready(server: ServerProcess, timeout_s: float, ready: Any = None) -> ServerProcess:
    """Waits until ``/healthz`` answers 200 (and ``ready()``, if given, is true).

    Raises:
        AbkdError: the server exited, or was not ready within ``timeout_s`` (its log's last
            line is in the message); it is stopped first.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        if server.proc.poll() is not None:
            stop_server(server)
            raise AbkdError(
                f"bench --http: {server.name} server exited: {_last_line(server.log_path)}"
            )
        try:
            if _get(server.port, "/healthz")[0] == 200 and (ready is None or ready()):
                return server
        except OSError:
            pass
        if time.monotonic() > deadline:
            stop_server(server)
            raise AbkdError(
                f"bench --http: {server.name} server not ready after {timeout_s:g} s: "
                f"{_last_line(server.log_path)}"
            )
        time.sleep(0.05)


def start_server(
    name: str, command: list[str], port: int, log_dir: Path, timeout_s: float, ready: Any = None
) -> ServerProcess:
    """:func:`launch` then :func:`wait_ready`."""
    return wait_ready(launch(name, command, port, log_dir), timeout_s, ready)


def _last_line(path: Path) -> str:
    lines = path.read_text(errors="replace").strip().splitlines()
    return lines[-1] if lines else "(no output)"


def stop_server(
    server: ServerProcess,
    timeout_s: float = 60.0,
    rss: dict[str, float] | None = None,
    linger_s: float = LINGER_S,
) -> dict[str, Any]:
    """SIGTERM, wait (then SIGKILL the group); records exit status, leftovers, port and
    the RSS per process (``rss``, measured before the SIGTERM, or now).

    Processes of the group still alive ``linger_s`` after the leader exited (or when it
    did not exit within ``timeout_s``) are leftovers: recorded, then killed.
    """
    if server.stopped:
        return server.stopped
    proc, pgid = server.proc, server.proc.pid
    rss = server.rss_mb() if rss is None else rss
    server.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout_s)
    leftovers = _wait_group_empty(pgid, linger_s if proc.poll() is not None else 0.0)
    if leftovers or proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        proc.wait()
    server.stopped = {
        "exit_code": proc.returncode,
        "leftover_pids": leftovers,
        "port_free": port_is_free(server.port),
        "rss_mb": rss,
    }
    return server.stopped


def _wait_group_empty(pgid: int, timeout_s: float) -> list[int]:
    """The group's live processes once it is empty or ``timeout_s`` has passed."""
    deadline = time.monotonic() + timeout_s
    while (pids := group_pids(pgid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return pids


def raw_request(body: bytes, port: int) -> bytes:
    """A keep-alive ``POST /v1/predict`` HTTP/1.1 request carrying the JSON ``body``."""
    head = (
        f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def _post(port: int, body: bytes) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", "/v1/predict", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def verify_serve(
    port: int, export_dir: Path, requests: dict[int, np.ndarray], device: str
) -> tuple[dict[str, Any], dict[int, bytes]]:
    """Sends one request per batch size to ``serve`` and compares it with Predictor.

    Returns:
        ``(check, bodies)``: the check's facts and, per batch size, the body ``serve`` sent.

    Raises:
        AbkdError: a non-200 answer, or answers that differ from Predictor's.
    """
    from abkd_deploy.serve.predictor import Predictor

    predictor = Predictor(
        export_dir, device=device, threads=1, max_batch=max(r.shape[1] for r in requests.values())
    )
    bodies, worst = {}, 0.0
    for b, batches in requests.items():
        ids = batches[0]
        status, body = _post(port, orjson.dumps({"node_ids": ids.tolist()}))
        if status != 200:
            raise AbkdError(f"bench --http: serve answered {status} to {b} ids: {body[:200]!r}")
        got, want = orjson.loads(body), predictor.predict(ids)
        scores = np.asarray(got.get("scores"), dtype=np.float64)
        same = got.get("predictions") == want.classes.tolist() and scores.shape == want.scores.shape
        diff = float(np.max(np.abs(scores - want.scores))) if same else float("inf")
        if not same or diff > SCORE_TOLERANCE:
            raise AbkdError(
                f"bench --http: serve's answer for {b} ids differs from Predictor's "
                f"(classes equal: {same}, max score difference {diff:.3g})"
            )
        bodies[b], worst = body, max(worst, diff)
    check = {"batch_sizes": sorted(bodies), "classes_equal": True, "max_abs_score_diff": worst}
    return check, bodies


def _trial_stats(trial: TrialResult) -> dict[str, float]:
    arr = np.asarray(trial.latencies_ms) if trial.latencies_ms else np.asarray([np.nan])
    n = len(trial.latencies_ms)
    return {
        "p50": float(np.percentile(arr, 50)),
        "p99": float(np.percentile(arr, 99)),
        "mean": float(arr.mean()),
        "rps": n / trial.wall_s if trial.wall_s > 0 else 0.0,
        "samples": n,
        "cpu_us": trial.cpu_s / n * 1e6 if n else float("nan"),
        "errors": trial.errors,
    }


def _cell(target: str, conc: int, batch: int, trials: list[dict[str, float]], procs: int) -> dict:
    med = {k: statistics.median(t[k] for t in trials) for k in ("p50", "p99", "mean", "rps")}
    cpu_us = statistics.median(t["cpu_us"] for t in trials)
    samples = [int(t["samples"]) for t in trials]
    return {
        "target": target,
        "concurrency": conc,
        "batch_size": batch,
        "trials_ms": {k: [t[k] for t in trials] for k in ("p50", "p99", "mean")},
        "trials_rps": [t["rps"] for t in trials],
        "trials_samples": samples,
        "p50_ms": med["p50"],
        "p99_ms": med["p99"],
        "mean_ms": med["mean"],
        "rps": med["rps"],
        "ids_per_s": med["rps"] * batch,
        "samples": {"per_trial": min(samples), "trials": len(samples), "total": sum(samples)},
        "errors": int(sum(t["errors"] for t in trials)),
        "client_cpu_us_per_request": cpu_us,
        "client_ceiling_rps": procs / (cpu_us * 1e-6) if cpu_us > 0 else None,
    }


def serve_command(
    export_dir: Path, port: int, opts: HttpOptions, device: str, threads: int | None
) -> list[str]:
    """``abkd-deploy serve`` as a user would start it (run with this Python)."""
    cmd = [sys.executable, "-m", "abkd_deploy.cli", "serve", str(export_dir)]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--device", device]
    if opts.workers > 1:
        cmd += ["--workers", str(opts.workers)]
    if opts.http != "auto":
        cmd += ["--http", opts.http]
    if threads:
        cmd += ["--threads", str(threads)]
    return cmd


def run_http_bench(
    export_dir: str | Path,
    requests: dict[int, np.ndarray],
    opts: HttpOptions,
    trials: int = 5,
    warmup: int = 5,
    trial_seconds: float = 3.0,
    device: str = "cpu",
    threads: int | None = None,
    in_process_p50: dict[int, float] | None = None,
) -> dict[str, Any]:
    """Measures ``serve`` and the floor app over HTTP; returns the report's ``http`` section.

    Args:
        export_dir: an ``embedded`` export.
        requests: ``{batch size: [R, b] int64 node ids}``, cycled by the clients.
        opts: concurrency levels, workers, client processes, ...
        trials, warmup, trial_seconds: see the module docstring.
        device, threads: passed to ``serve`` (``threads`` only when given).
        in_process_p50: ``{batch size: p50 ms}`` of Predictor, for the ratios.
    """
    export_dir = Path(export_dir)
    from abkd_deploy.serve.limits import event_loop, http_protocol

    parser = http_protocol(opts.http).__name__
    servers: dict[str, ServerProcess] = {}
    cells: dict[tuple[str, int, int], list[dict[str, float]]] = {}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="abkd-bench-http-") as tmp_name:
        tmp = Path(tmp_name)
        try:
            port = floor_port = free_port()
            while floor_port == port:
                floor_port = free_port()
            (tmp / "ready").mkdir()
            floor_cmd = [sys.executable, "-m", "abkd_deploy.serve.bench_floor"]
            floor_cmd += [str(tmp / "bodies.json"), str(floor_port), str(opts.workers)]
            floor_cmd += [opts.http, str(tmp / "ready")]
            floor = launch("floor", floor_cmd, floor_port, tmp)  # loads while serve does
            servers["floor"] = floor
            servers["serve"] = start_server(
                "serve",
                serve_command(export_dir, port, opts, device, threads),
                port,
                tmp,
                opts.startup_timeout_s,
                ready=_workers_listening(tmp / "serve.log", opts.workers),
            )
            check, bodies = verify_serve(port, export_dir, requests, device)
            staged = tmp / "bodies.json.tmp"
            staged.write_text(json.dumps({b: v.decode() for b, v in bodies.items()}))
            staged.rename(tmp / "bodies.json")
            wait_ready(
                floor,
                opts.startup_timeout_s,
                ready=lambda: len(os.listdir(tmp / "ready")) >= opts.workers,
            )
            servers = {"serve": servers["serve"], "floor": floor}  # serve first in each trial
            with ClientPool(opts.client_processes) as pool:
                for s in servers.values():  # untimed: first connections, caches, JIT
                    first = [
                        raw_request(orjson.dumps({"node_ids": r.tolist()}), s.port)
                        for b in opts.batch_sizes
                        for r in requests[b]
                    ]
                    pool.run(LoadJob(s.port, first, max(opts.concurrency), 4 * len(first), 0))
                for conc in opts.concurrency:
                    for b in opts.batch_sizes:
                        raw = {
                            name: [
                                raw_request(orjson.dumps({"node_ids": ids.tolist()}), s.port)
                                for ids in requests[b]
                            ]
                            for name, s in servers.items()
                        }
                        for _ in range(trials):
                            for name, s in servers.items():
                                job = LoadJob(
                                    s.port, raw[name], conc, opts.requests, warmup, trial_seconds
                                )
                                trial = _trial_stats(pool.run(job))
                                cells.setdefault((name, conc, b), []).append(trial)
        finally:
            rss = {name: s.rss_mb() for name, s in servers.items()}
            for s in servers.values():  # both drain at once
                s.terminate()
            stopped = {name: stop_server(s, rss=rss[name]) for name, s in servers.items()}
    results = [_cell(*key, trial, opts.client_processes) for key, trial in cells.items()]
    commands = {name: shlex.join(_display(s.command)) for name, s in servers.items()}
    return {
        "config": {
            **asdict(opts),
            "trials": trials,
            "warmup_per_connection": warmup,
            "trial_seconds": trial_seconds,
            "parser": parser,
            "loop": event_loop(),
            "device": device,
            "threads": threads,
        },
        "commands": commands,
        "check": check,
        "servers": stopped,
        "results": results,
        "ratios": http_ratios(results, in_process_p50 or {}),
        "warnings": http_warnings(results, stopped),
        "seconds": time.perf_counter() - start,
    }


def _workers_listening(log: Path, workers: int) -> Any:
    if workers == 1:
        return None
    return lambda: "workers listening" in log.read_text(errors="replace")


def _display(command: list[str]) -> list[str]:
    """``python -m abkd_deploy.cli serve ...`` shown as ``abkd-deploy serve ...``."""
    if command[1:3] == ["-m", "abkd_deploy.cli"]:
        return ["abkd-deploy", *command[3:]]
    return ["python", *command[1:]]


def http_ratios(results: Sequence[dict[str, Any]], in_process_p50: dict[int, float]) -> dict:
    """``serve/floor`` p50, p99 and req/s per cell; ``serve/in-process`` p50 at concurrency 1."""
    by = {(r["target"], r["concurrency"], r["batch_size"]): r for r in results}
    out: dict[str, float] = {}
    for (target, conc, b), r in by.items():
        floor = by.get(("floor", conc, b))
        if target != "serve" or floor is None:
            continue
        for key, label in (("p50_ms", "p50"), ("p99_ms", "p99"), ("rps", "req/s")):
            if floor[key] > 0:
                out[f"serve/floor {label} @ c{conc} b{b}"] = r[key] / floor[key]
        if conc == 1 and in_process_p50.get(b):
            out[f"serve/in-process p50 @ c1 b{b}"] = r["p50_ms"] / in_process_p50[b]
    return out


def http_warnings(results: Sequence[dict[str, Any]], stopped: dict[str, dict]) -> list[str]:
    """Errors, thin percentiles, a client near its own ceiling, servers that did not stop."""
    out = []
    for r in results:
        cell = f"http {r['target']} c{r['concurrency']} b{r['batch_size']}"
        if r["errors"]:
            out.append(f"{cell}: {r['errors']} request(s) failed (not 200 or connection lost)")
        if r["samples"]["per_trial"] < MIN_SAMPLES:
            out.append(
                f"{cell}: p50/p99 rest on {r['samples']['per_trial']} request(s) per trial "
                f"(fewer than {MIN_SAMPLES}); treat them as rough"
            )
        ceiling = r.get("client_ceiling_rps")
        if ceiling and r["rps"] > 0.5 * ceiling:
            out.append(
                f"{cell}: {r['rps']:,.0f} req/s is over half the client's ceiling "
                f"({ceiling:,.0f} req/s): the client may limit it"
            )
    for name, s in stopped.items():
        if s["leftover_pids"] or not s["port_free"]:
            out.append(
                f"{name} server: leftover processes {s['leftover_pids']} (killed), port free "
                f"after stop: {s['port_free']}"
            )
    return out


def format_http_markdown(section: dict[str, Any], usable_cores: int | None) -> list[str]:
    """The ``bench.md`` lines of the ``http`` section: settings, one row per cell, ratios."""
    c = section["config"]
    lines = [
        "## HTTP (closed-loop clients, keep-alive connections, loopback)",
        "",
        f"- serve: `{section['commands'].get('serve', '?')}`",
        f"- floor: bare FastAPI app answering the same bytes, same uvicorn settings "
        f"({c['parser']}, {c['loop']}, {c['workers']} worker(s))",
        f"- clients: {c['client_processes']} process(es), asyncio raw streams; "
        f"{c['requests']} requests per trial, {c['trials']} trials (serve and floor "
        f"alternating; medians reported), warm-up {c['warmup_per_connection']} per connection",
    ]
    need = c["client_processes"] + c["workers"]
    if usable_cores is not None and usable_cores < 2 * need:
        lines.append(
            f"- **{usable_cores} cores: client ({c['client_processes']} process(es)) and "
            f"server ({c['workers']} worker(s)) compete for them**; the floor pays the same"
        )
    check = section.get("check") or {}
    if check:
        lines.append(
            f"- checked: serve's answers equal Predictor's for batch sizes "
            f"{check['batch_sizes']} (max score difference {check['max_abs_score_diff']:.2g})"
        )
    lines += [
        "",
        "| target | clients | ids | p50 ms | p99 ms | samples | req/s | ids/s "
        "| client CPU us/req | client ceiling req/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = sorted(
        section["results"],
        key=lambda r: (r["concurrency"], r["batch_size"], TARGETS.index(r["target"])),
    )
    for r in rows:
        n = r["samples"]
        few = " (!)" if n["per_trial"] < MIN_SAMPLES else ""
        ceiling = r.get("client_ceiling_rps")
        lines.append(
            f"| {r['target']} | {r['concurrency']} | {r['batch_size']} | {r['p50_ms']:.3f} "
            f"| {r['p99_ms']:.3f} | {n['per_trial']} x {n['trials']}{few} | {r['rps']:,.0f} "
            f"| {r['ids_per_s']:,.0f} | {r['client_cpu_us_per_request']:.0f} "
            f"| {f'{ceiling:,.0f}' if ceiling else '?'} |"
        )
    return lines

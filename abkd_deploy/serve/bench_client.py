"""Closed-loop HTTP load for ``bench --http``: client processes with keep-alive connections.

Each client process runs an asyncio event loop (uvloop when installed) with its share of
the connections; a connection sends a prebuilt raw HTTP/1.1 request, reads the whole
response (status line, headers, ``content-length`` body), records the latency and sends
the next one (closed loop: concurrency = connections). The processes start every trial
together (the parent releases them once all are connected and warm) and report
per-request latencies, the trial's start and end (``time.monotonic``: one clock for every
process) and their own CPU time, from which the client's ceiling (requests/s it could
send on its cores) is derived.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import IO, Any

import orjson

from abkd_deploy.errors import AbkdError


@dataclass(frozen=True)
class LoadJob:
    """One timed trial against one server.

    Attributes:
        port: loopback TCP port of the server.
        requests: raw HTTP requests (bytes), cycled; connection ``k`` starts at a
            different one.
        concurrency: connections, all kept alive (spread over the client processes).
        total: requests of the trial, all connections together (each sends its share).
        warmup: untimed requests per connection before the trial.
        seconds: a connection stops early after this long (keeping >= 1 request).
        host: the server's address.
    """

    port: int
    requests: list[bytes]
    concurrency: int
    total: int
    warmup: int = 2
    seconds: float = 3.0
    host: str = "127.0.0.1"


@dataclass
class TrialResult:
    """What the clients saw in one trial.

    Attributes:
        latencies_ms: per request, in completion order within each connection.
        wall_s: first start to last end over all client processes.
        cpu_s: CPU time of the client processes during the trial.
        errors: responses that were not 200 or connections that broke.
        start: ``time.monotonic()`` at the trial's start (in one process).
        end: ``time.monotonic()`` at its end.
    """

    latencies_ms: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    cpu_s: float = 0.0
    errors: int = 0
    start: float = 0.0
    end: float = 0.0


async def _read_response(reader: asyncio.StreamReader) -> int:
    """Reads one response; returns its status."""
    head = await reader.readuntil(b"\r\n\r\n")
    lower = head.lower()
    at = lower.find(b"\r\ncontent-length:")
    if at < 0:
        raise ConnectionError("response without content-length")
    length = int(lower[at + 17 : lower.index(b"\r\n", at + 2)])
    await reader.readexactly(length)
    return int(head[9:12])


async def _connection_loop(
    conn: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    requests: list[bytes],
    first: int,
    count: int,
    deadline: float | None,
    latencies: list[float],
) -> int:
    """Sends ``count`` requests on one connection; returns the error count."""
    reader, writer = conn
    errors = 0
    for i in range(count):
        request = requests[(first + i) % len(requests)]
        start = time.perf_counter()
        writer.write(request)
        try:
            status = await _read_response(reader)
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            return errors + 1  # the connection is gone: the rest of its share is lost
        latencies.append((time.perf_counter() - start) * 1e3)
        errors += status != 200
        if deadline is not None and time.monotonic() > deadline:
            break
    return errors


async def _run_share(
    job: LoadJob, index: int, processes: int, ready: Callable[[], bool]
) -> TrialResult:
    """This process's connections (``index``, ``index + processes``, ...) for one trial.

    ``ready()`` is called once connected and warm; it blocks until every process is, and
    returns whether to run the trial.
    """
    mine = list(range(index, job.concurrency, processes))
    conns = [await asyncio.open_connection(job.host, job.port) for _ in mine]
    per_conn = math.ceil(job.total / job.concurrency)
    stride = max(1, len(job.requests) // max(1, job.concurrency))
    result = TrialResult()
    try:
        warm = [
            _connection_loop(c, job.requests, k * stride, job.warmup, None, [])
            for k, c in zip(mine, conns, strict=True)
        ]
        result.errors += sum(await asyncio.gather(*warm))
        if not ready():
            return result
        cpu, start = time.process_time(), time.monotonic()
        deadline = start + job.seconds
        loops = [
            _connection_loop(c, job.requests, k * stride, per_conn, deadline, result.latencies_ms)
            for k, c in zip(mine, conns, strict=True)
        ]
        result.errors += sum(await asyncio.gather(*loops))
        result.start, result.end = start, time.monotonic()
        result.cpu_s = time.process_time() - cpu
        result.wall_s = result.end - start
    finally:
        for _, writer in conns:
            writer.close()
    return result


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _send(stream: IO[bytes], message: dict[str, Any]) -> None:
    stream.write(orjson.dumps(message) + b"\n")
    stream.flush()


def _job_message(job: LoadJob) -> dict[str, Any]:
    fields = asdict(job)
    fields["requests"] = [r.decode("latin-1") for r in job.requests]
    return {"job": fields}


def client_main(index: int, processes: int) -> None:
    """A client process (``python -m abkd_deploy.serve.bench_client INDEX PROCESSES``).

    Protocol, one JSON document per line: the parent sends ``{"job": ...}``; the client
    connects and warms up, answers ``{"ready": true}`` (or ``{"error": ...}``), waits for
    ``{"go": true|false}`` and answers ``{"result": ...}``. End of input ends the process.
    """
    inp, out = sys.stdin.buffer, sys.stdout.buffer

    def ready() -> bool:
        _send(out, {"ready": True})
        return bool(orjson.loads(inp.readline()).get("go"))

    loop = _new_loop()
    try:
        while line := inp.readline():
            fields = orjson.loads(line)["job"]
            fields["requests"] = [r.encode("latin-1") for r in fields["requests"]]
            try:
                result = loop.run_until_complete(
                    _run_share(LoadJob(**fields), index, processes, ready)
                )
            except Exception as exc:  # before "ready": reported to the parent, which raises
                _send(out, {"error": f"{type(exc).__name__}: {exc}"})
                continue
            _send(out, {"result": asdict(result)})
    finally:
        loop.close()


class ClientPool:
    """``processes`` client processes (fresh interpreters: nothing of the parent is
    inherited, and the caller's ``__main__`` is never re-imported).

    Use as a context manager; :meth:`run` runs one trial on all of them.
    """

    def __init__(self, processes: int = 1) -> None:
        self.processes = processes
        self._procs = [
            subprocess.Popen(
                [sys.executable, "-m", "abkd_deploy.serve.bench_client", str(i), str(processes)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
            for i in range(processes)
        ]

    def _recv(self, proc: subprocess.Popen) -> dict[str, Any]:
        line = proc.stdout.readline() if proc.stdout else b""
        if not line:
            raise AbkdError(f"an HTTP client process died (exit code {proc.poll()})")
        return orjson.loads(line)

    def run(self, job: LoadJob) -> TrialResult:
        """Runs ``job`` (one trial) over every process; returns the combined result.

        Raises:
            AbkdError: a client process failed (its error message) or died.
        """
        message = _job_message(job)
        for proc in self._procs:
            _send(proc.stdin, message)
        answers = [self._recv(proc) for proc in self._procs]
        failed = [a["error"] for a in answers if "error" in a]
        for proc, answer in zip(self._procs, answers, strict=True):  # start together, or not at all
            if "ready" in answer:
                _send(proc.stdin, {"go": not failed})
        parts = [
            TrialResult(**self._recv(p)["result"])
            for p, a in zip(self._procs, answers, strict=True)
            if "ready" in a
        ]
        if failed:
            raise AbkdError(f"HTTP client failed: {failed[0]}")
        out = TrialResult(start=min(p.start for p in parts), end=max(p.end for p in parts))
        for part in parts:
            out.latencies_ms += part.latencies_ms
            out.cpu_s += part.cpu_s
            out.errors += part.errors
        out.wall_s = out.end - out.start
        return out

    def close(self) -> None:
        """Stops the client processes (end of input)."""
        for proc in self._procs:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        for proc in self._procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout:
                proc.stdout.close()

    def __enter__(self) -> ClientPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


if __name__ == "__main__":
    client_main(int(sys.argv[1]), int(sys.argv[2]))

"""Progress of long loops (training epochs, bench models): a bar on a terminal, lines in logs.

On a terminal a tqdm bar redraws itself in place. Into a log file, a pipe or CI output the
same bar would write one ever-growing line of carriage returns (28 KB for a 300-epoch
run), so there :class:`Progress` writes plain lines instead: one per 10% of the loop (one
per step when there are at most 10), at most 11 lines whatever the length of the loop.
Either way :meth:`Progress.close` ends with one summary line (the stage's outcome).

``ABKD_PROGRESS=bar|lines|off`` overrides the choice (default: ``bar`` when the stream
is a terminal, else ``lines``).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

#: Environment variable forcing the progress mode.
ENV = "ABKD_PROGRESS"
MODES = ("bar", "lines", "off")


def progress_mode(stream: TextIO | None = None) -> str:
    """``bar``, ``lines`` or ``off``: :data:`ENV` if set, else ``bar`` on a terminal."""
    forced = os.environ.get(ENV, "").strip().lower()
    if forced in MODES:
        return forced
    stream = stream or sys.stderr
    try:
        return "bar" if stream.isatty() else "lines"
    except (AttributeError, ValueError):  # closed or not a real stream
        return "lines"


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


class Progress:
    """Reports steps ``1..total`` of a loop.

    Args:
        total: Number of steps planned (a loop may stop early, e.g. early stopping).
        desc: Label of every line (``"teacher gcnii"``).
        enabled: ``False``: report nothing (not even the summary).
        stream: Where to write (default: ``sys.stderr``).
        unit: Name of one step in lines (``"epoch"``).

    Example::

        with Progress(300, "teacher gcn", unit="epoch") as bar:
            for epoch in range(1, 301):
                bar.update({"ce": 0.41, "val": 0.80})
            bar.close("best epoch 212, val 0.8120")
    """

    def __init__(
        self,
        total: int,
        desc: str,
        enabled: bool = True,
        stream: TextIO | None = None,
        unit: str = "step",
    ) -> None:
        self.total, self.desc, self.unit = max(int(total), 1), desc, unit
        self.stream = stream or sys.stderr
        self.mode = progress_mode(self.stream) if enabled else "off"
        self.step = 0
        self._logged = 0
        self._info: dict[str, str] = {}
        self._start = time.perf_counter()
        self._closed = False
        self._bar = None
        if self.mode == "bar":
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=self.total,
                desc=desc,
                file=self.stream,
                leave=False,
                dynamic_ncols=True,
                mininterval=0.5,
            )

    def update(self, info: Mapping[str, Any] | None = None) -> None:
        """Marks one more step done; ``info`` (e.g. losses) is shown with it."""
        self.step += 1
        if info is not None:
            self._info = {k: _fmt(v) for k, v in info.items()}
        if self._bar is not None:
            self._bar.set_postfix(self._info, refresh=False)
            self._bar.update(1)
        elif self.mode == "lines" and self._tenth(self.step) > self._tenth(self.step - 1):
            self._line()

    def close(self, summary: str | None = None) -> None:
        """Ends the report: the last step if not yet shown, then ``summary`` if given."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.mode == "lines" and self.step > self._logged:
            self._line()
        if summary and self.mode != "off":
            self._write(f"{self.desc}: {summary}")

    def _tenth(self, step: int) -> int:
        return step if self.total <= 10 else (10 * step) // self.total

    def _line(self) -> None:
        self._logged = self.step
        pct = 100 * self.step // self.total
        info = "".join(f" {k} {v}" for k, v in self._info.items())
        elapsed = time.perf_counter() - self._start
        self._write(
            f"{self.desc}: {self.unit} {self.step}/{self.total} ({pct}%){info} [{elapsed:.1f} s]"
        )

    def _write(self, line: str) -> None:
        print(line, file=self.stream, flush=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

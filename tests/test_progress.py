"""Progress reporting: plain bounded lines when the stream is not a terminal."""

import io

import pytest

from abkd_deploy.progress import ENV, Progress, progress_mode


@pytest.fixture(autouse=True)
def _no_forced_mode(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)


def _run(total: int, steps: int, summary: str | None = "done") -> list[str]:
    stream = io.StringIO()
    bar = Progress(total, "teacher gcn", stream=stream, unit="epoch")
    for i in range(steps):
        bar.update({"ce": 1.0 / (i + 1), "val": 0.5})
    bar.close(summary)
    text = stream.getvalue()
    assert "\r" not in text
    return text.splitlines()


def test_long_loop_logs_one_line_per_tenth_then_the_summary():
    lines = _run(300, 300)
    assert len(lines) == 11
    assert lines[0].startswith("teacher gcn: epoch 30/300 (10%) ce 0.033 val 0.500")
    assert lines[9].startswith("teacher gcn: epoch 300/300 (100%)")
    assert lines[-1] == "teacher gcn: done"


def test_early_stop_logs_the_last_step_once():
    lines = _run(300, 45)
    assert [line.split(" (")[0] for line in lines[:-1]] == [
        "teacher gcn: epoch 30/300",
        "teacher gcn: epoch 45/300",
    ]
    assert lines[-1] == "teacher gcn: done"


def test_short_loop_logs_every_step():
    lines = _run(4, 4, summary=None)
    assert [line.split(" (")[0] for line in lines] == [
        f"teacher gcn: epoch {i}/4" for i in range(1, 5)
    ]


def test_disabled_writes_nothing():
    stream = io.StringIO()
    with Progress(10, "x", enabled=False, stream=stream) as bar:
        bar.update()
        bar.close("summary")
    assert stream.getvalue() == ""


def test_mode_follows_the_terminal_and_the_environment(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert progress_mode(io.StringIO()) == "lines"
    assert progress_mode(Tty()) == "bar"
    monkeypatch.setenv(ENV, "off")
    assert progress_mode(Tty()) == "off"
    monkeypatch.setenv(ENV, "lines")
    assert progress_mode(Tty()) == "lines"


def test_bar_on_a_terminal_still_ends_with_the_summary():
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Tty()
    with Progress(50, "bench", stream=stream, unit="model") as bar:
        for _ in range(50):
            bar.update()
        bar.close("50 models")
    assert stream.getvalue().rstrip().endswith("bench: 50 models")

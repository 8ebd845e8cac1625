"""trainer.progress: a tqdm bar with ETA when stdout is a terminal, the console logger's plain lines otherwise.

A terminal is faked with a StringIO whose isatty() is True; the trainer tests swap it in for sys.stdout."""

import io
import sys

import pytest

from moetrain.cli import train_main
from moetrain.telemetry.loggers import ConsoleLogger
from moetrain.telemetry.progress import Progress, is_terminal
from tests.train_utils import overrides


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def screen_lines(text: str) -> list[str]:
    """What a terminal shows: each carriage return starts the line over (tqdm clears by overwriting with spaces)."""
    return [line.split("\r")[-1].rstrip() for line in text.split("\n")]


def test_is_terminal():
    assert is_terminal(FakeTerminal()) and not is_terminal(io.StringIO())
    closed = io.StringIO()
    closed.close()  # isatty() raises ValueError
    assert not is_terminal(closed) and not is_terminal(object())


def test_bar_on_a_terminal_with_log_lines_above_it():
    term = FakeTerminal()
    console = ConsoleLogger(term)
    with Progress(total=10, initial=4, stream=term) as bar:  # resumed at step 4
        assert bar.active
        assert "4/10" in term.getvalue()
        for step in range(5, 11):
            bar.update(step, {"loss": 1.0 / step})
            if step == 8:
                console.log(step, {"loss": 0.125})
    lines = screen_lines(term.getvalue())
    assert "step      8 | loss 0.1250" in lines  # printed on a line of its own, not glued to the bar
    final = [line for line in lines if "10/10" in line]
    assert final and final[-1].startswith("train: 100%") and "loss 0.1000" in final[-1], lines


@pytest.mark.parametrize("stream, enabled", [(io.StringIO(), True), (FakeTerminal(), False)])
def test_no_bar_off_a_terminal_or_when_disabled(stream, enabled):
    bar = Progress(total=5, stream=stream, enabled=enabled)
    assert not bar.active
    console = ConsoleLogger(stream)
    for step in range(1, 6):
        bar.update(step, {"loss": 2.0})
        if step == 5:
            console.log(step, {"loss": 2.0, "eta_s": 0.0})
    bar.close()
    assert stream.getvalue() == "step      5 | loss 2.0000 | eta 0m00s\n"  # plain lines only: no \r, no bar


def _train(tmp_path, monkeypatch, stdout, name):
    monkeypatch.setattr(sys, "stdout", stdout)
    args = overrides(tmp_path / name, tmp_path / "cache", "trainer.max_steps=4", "trainer.log_every=2",
                     "trainer.progress=true", "logger.console=true", "logger.jsonl=false")
    assert train_main(args) == 0
    return stdout.getvalue()


def test_training_on_a_terminal_draws_the_bar(tmp_path, monkeypatch):
    out = _train(tmp_path, monkeypatch, FakeTerminal(), "tty")
    lines = screen_lines(out)
    assert any(line.startswith("train: 100%") and "4/4" in line for line in lines), lines
    assert [line.split("|")[0].strip() for line in lines if line.startswith("step ")] == ["step      2",
                                                                                          "step      4"]


def test_training_off_a_terminal_prints_plain_lines(tmp_path, monkeypatch):
    out = _train(tmp_path, monkeypatch, io.StringIO(), "pipe")
    assert "\r" not in out and "train:" not in out
    assert [line.split("|")[0].strip() for line in out.splitlines()] == ["step      2", "step      4"]

"""The progress reporter (callback on every report, INFO lines rate-limited) and the command
line's progress line (redrawn in place on a terminal, plain lines otherwise), on a fake
clock."""

from __future__ import annotations

import argparse
import io
import logging
from types import SimpleNamespace
from typing import Any

import pytest

import pgstreams as ps
from pgstreams._core import progress as core
from pgstreams.cli import progress as cli_progress

pytestmark = pytest.mark.anyio


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    for module in (core, cli_progress):  # their own reference to time, not the time module
        monkeypatch.setattr(module, "time", SimpleNamespace(monotonic=fake))
    return fake


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if getattr(r, "pgstreams_progress", False)]


async def test_reports_go_to_the_callback_and_logs_are_rate_limited(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    got: list[ps.Progress] = []

    async def callback(report: ps.Progress) -> None:
        got.append(report)

    caplog.set_level(logging.INFO, logger="test.progress")
    report = core.Reporter(
        "requeue_dead", callback, logging.getLogger("test.progress"), "q", "messages"
    )
    await report.start(10, "jobs")
    for _ in range(3):
        clock.now += 0.5
        await report.advance(2)
    clock.now += 1.0  # 2.5 s since the start line
    await report.advance(2)
    await report.finish()  # 8 of the 10 counted: the total is revised to what was done
    assert [(r.done, r.total) for r in got] == [(0, 10), (2, 10), (4, 10), (6, 10), (8, 10), (8, 8)]
    assert {(r.operation, r.detail) for r in got} == {("requeue_dead", "jobs")}
    assert lines(caplog) == [
        "q: starting, 10 messages",
        "q: 8/10 messages",
        "q: done, 8 messages in 2.5 s",
    ]


async def test_a_total_passed_is_raised_and_nothing_to_do_is_quiet(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    got: list[ps.Progress] = []
    caplog.set_level(logging.INFO, logger="test.progress")
    report = core.Reporter("migrate", got.append, logging.getLogger("test.progress"), "m", "x")
    await report.start(1)
    await report.advance(1, "a")
    await report.advance(1, "b")  # more than counted at the start (another process)
    await report.finish()  # already at its total: no extra report
    assert [(r.done, r.total, r.detail) for r in got] == [(0, 1, ""), (1, 1, "a"), (2, 2, "b")]
    caplog.clear()
    quiet = core.Reporter("migrate", None, logging.getLogger("test.progress"), "m", "x")
    await quiet.start(0)
    await quiet.finish()
    assert lines(caplog) == []


def test_progress_must_be_callable() -> None:
    assert core.check_progress(None) is None
    assert core.check_progress(print) is print
    with pytest.raises(ps.InvalidArgumentError, match="progress must be a callable"):
        core.check_progress("no")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_one_line_redrawn_in_place(clock: Clock) -> None:
    out = Terminal()
    line = cli_progress.ProgressLine(out)
    line(ps.Progress("requeue_dead", 0, 2500, "jobs"))
    clock.now += 0.05
    line(ps.Progress("requeue_dead", 1000, 2500, "jobs"))  # too soon after the last: skipped
    clock.now += 0.1
    line(ps.Progress("requeue_dead", 2000, 2500, "jobs"))
    line(ps.Progress("requeue_dead", 2500, 2500, "jobs"))  # the last always shows
    line.close()
    assert out.getvalue() == (
        "\rrequeue_dead jobs: 0/2500 messages (0%)\x1b[K"
        "\rrequeue_dead jobs: 2000/2500 messages (80%)\x1b[K"
        "\rrequeue_dead jobs: 2500/2500 messages (100%)\x1b[K\n"
    )


def test_other_streams_get_plain_lines_every_two_seconds(clock: Clock) -> None:
    out = io.StringIO()
    line = cli_progress.ProgressLine(out)
    for done in range(5):
        line(ps.Progress("migrate", done, 4 if done == 4 else 9, f"000{done}_x"))
        clock.now += 1.0
    clock.now += 1.0
    line(ps.Progress("snapshot", 7, None, "public.users"))
    line.close()
    assert out.getvalue().splitlines() == [
        "migrate: 0/9 migrations (0%) 0000_x",
        "migrate: 2/9 migrations (22%) 0002_x",
        "migrate: 4/4 migrations (100%) 0004_x",
        "snapshot public.users: 7 rows",
    ]
    quiet = io.StringIO()
    cli_progress.ProgressLine(quiet, quiet=True)(ps.Progress("backfill", 1, 1, "s"))
    assert quiet.getvalue() == ""


def test_the_progress_line_holds_back_the_library_progress_log_lines(
    capsys: pytest.CaptureFixture[str],
) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    root.addHandler(handler)
    log = logging.getLogger("test.progress.cli")
    log.setLevel(logging.INFO)
    try:
        args: Any = argparse.Namespace(quiet=False)
        with cli_progress.progress_line(args):
            log.info("counted", extra={"pgstreams_progress": True})
            log.info("something else")
        log.info("counted again", extra={"pgstreams_progress": True})
    finally:
        root.removeHandler(handler)
    assert stream.getvalue().splitlines() == ["something else", "counted again"]
    assert capsys.readouterr().out == ""

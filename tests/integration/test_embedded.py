"""The embedded PostgreSQL: starts, is configured for logical decoding, cleans up after itself."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import pgstreams as ps
from pgstreams._pg.embedded import EmbeddedPostgres, find_bindir


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


async def test_embedded_yields_a_working_database() -> None:
    async with ps.embedded() as db:
        async with db.connection() as conn:
            cur = await conn.execute(
                "SELECT current_setting('wal_level'),"
                " current_setting('max_replication_slots')::int, current_user"
            )
            assert await cur.fetchone() == ("logical", 32, "postgres")
        q = await ps.PgQueue.create(db, "smoke")
        await q.publish({"hello": "world"})
        assert await q.subscribe().first() == {"hello": "world"}
        dsn = db.dsn
    assert "127.0.0.1" in dsn


def test_stop_removes_process_and_directory() -> None:
    server = EmbeddedPostgres()
    server.start()
    assert server._proc is not None and server._tmpdir is not None
    pid, tmpdir = server._proc.pid, server._tmpdir
    if os.geteuid() == 0:
        assert Path(f"/proc/{pid}").stat().st_uid != 0  # runs unprivileged
    server.stop()
    server.stop()  # idempotent
    assert not _alive(pid)
    assert not os.path.exists(tmpdir)


@pytest.mark.skipif(sys.platform != "linux", reason="parent-death signal is Linux-only")
def test_killed_parent_takes_the_server_with_it() -> None:
    child = subprocess.Popen(
        [sys.executable, str(Path(__file__).parents[1] / "_embedded_child.py")],
        stdout=subprocess.PIPE,
        cwd=Path(__file__).parents[2],
    )
    try:
        assert child.stdout is not None
        pid_text, tmpdir = child.stdout.readline().split()
        postmaster = int(pid_text)
        assert _alive(postmaster)
        child.send_signal(signal.SIGKILL)
        child.wait()
        deadline = time.monotonic() + 10
        while _alive(postmaster) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not _alive(postmaster)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if child.stdout is not None:
            child.stdout.close()
    # The killed parent could not clean up after its server: do it here.
    shutil.rmtree(tmpdir, ignore_errors=True)


def test_bindir_override_must_hold_binaries(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PGSTREAMS_PG_BINDIR", str(tmp_path))
    with pytest.raises(ps.EmbeddedPostgresError):
        find_bindir()

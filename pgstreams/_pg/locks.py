"""The one advisory-lock key scheme of pgstreams, so operators can find its locks in pg_locks.

A key is made from a text naming what is locked: ``pgstreams:<kind>:<part>:...``, the parts
joined with ``:``. Every part but the last is a validated name (``[a-z0-9_]``, or an empty
table prefix), so only the last may contain a colon and no two locks share a text. The key
is the first 8 bytes of the SHA-256 digest of that text in UTF-8, read as a signed
big-endian 64-bit integer: the same in every process, every language and every PostgreSQL
version (11 and later), and computable on the server with documented functions (see
:data:`KEY_SQL`), which the workflow run locks use since they are taken in the statement
that claims the runs.

The locks the library takes (``<schema>`` is the Database's or storage's schema):

========================================  =======  =========================================
text                                      scope    held while
========================================  =======  =========================================
``pgstreams:migrate:<schema>``            xact     any migration of that schema runs (the
                                                   main set, or one queue's, workflow
                                                   prefix's or snapshot table's set)
``pgstreams:queue:<schema>:<queue>``      xact     a PgQueue is created, dropped or upgraded
``pgstreams:pgmq-install``                xact     the pgmq extension or its SQL is installed
``pgstreams:pgmq:<queue>``                xact     a PgmqQueue is created or dropped
``pgstreams:capture:<table>``             xact     a change-capture trigger is installed or
                                                   removed (``<table>``: the stream key, the
                                                   table's qualified name)
``pgstreams:scheduler:<schema>``          session  a Scheduler process is the leader
``pgstreams:run:<schema>:<prefix>:<id>``  session  a workflow run executes in this process
                                                   (``<prefix>`` is the table prefix)
``pgstreams:prune:<schema>:<prefix>``     session  a worker's automatic retention prunes
                                                   those workflow tables
========================================  =======  =========================================

In ``pg_locks`` a 64-bit key shows as ``locktype = 'advisory'``, ``objsubid = 1``, its high
half in ``classid`` and its low half in ``objid``::

    SELECT l.pid, l.mode, l.granted, a.application_name
    FROM pg_locks l JOIN pg_stat_activity a USING (pid)
    WHERE l.locktype = 'advisory' AND l.objsubid = 1
      AND (l.classid::bigint << 32 | l.objid::bigint)
          = ('x' || left(encode(sha256(convert_to('pgstreams:scheduler:pgstreams', 'UTF8')),
                                'hex'), 16))::bit(64)::bigint;
"""

from __future__ import annotations

import hashlib

__all__ = ["KEY_SQL", "advisory_key", "lock_text"]

KEY_SQL = "('x' || left(encode(sha256(convert_to({}, 'UTF8')), 'hex'), 16))::bit(64)::bigint"
"""The key of a text, computed on the server (``{}`` is the text expression)."""


def lock_text(*parts: str) -> str:
    """The text a lock's key is made from: ``pgstreams:`` and the parts, joined with ``:``."""
    return ":".join(("pgstreams", *parts))


def advisory_key(*parts: str) -> int:
    """The signed 64-bit advisory-lock key of ``lock_text(*parts)`` (see module docstring)."""
    digest = hashlib.sha256(lock_text(*parts).encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)

"""Deferred commits: how an operator that must read ahead (the NATS sink, with many
messages in flight) keeps a durable source from committing what it has not finished.

A durable source -- a change consumer -- takes "the downstream asks for the next item" to
mean "the last one is finished", which forbids reading ahead. A source that can do better
gives its stream a ``Checkpoint``: once ``defer()`` is called (before the stream is
iterated), asking for the next item finishes nothing, and ``commit(item)`` finishes every
item handed out up to and including ``item``. Closing the stream then commits nothing more
on its own: what was handed out and not committed comes again next time.
"""

from __future__ import annotations

from typing import Any, Protocol

__all__ = ["Checkpoint"]


class Checkpoint(Protocol):
    def defer(self) -> None:
        """From now on, only ``commit`` finishes items."""
        ...

    async def commit(self, item: Any) -> None:
        """Every item handed out up to and including ``item`` is finished."""
        ...

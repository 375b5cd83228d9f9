"""What a change stream hands out: ``Change`` (one logged change) and ``ChangeLag``."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any, Generic, TypeVar

__all__ = [
    "Change",
    "ChangeLag",
    "change_document",
    "change_from_row",
    "committed_id",
    "new_change",
]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Change(Generic[T]):
    """One captured change (or a ``notify`` event) of a stream."""

    id: int
    """Trigger capture: the change's place in the log. WAL capture: its commit LSN
    shifted left 32 bits plus its place in the transaction (unique, in delivery order)."""
    op: str
    """"insert", "update", "delete", "truncate", "notify", or (WAL capture) "snapshot" for
    a row read by a snapshot."""
    table: str
    """The table, schema-qualified and quoted as PostgreSQL would (``public."Users"``)."""
    new: T | None
    """The row after the change (insert, update) or the payload of a notify."""
    old: T | None
    """The row before the change (update, delete)."""
    at: datetime
    """When the statement that made the change started (WAL capture: when its transaction
    committed)."""
    txid: int
    """The id of the transaction that made it."""
    pk: Mapping[str, Any] | None = field(default=None, compare=False)
    """The row's primary key (None for a truncate, a notify or a table without one; WAL
    capture: the replica identity's columns)."""
    lsn: str | None = None
    """WAL capture: the LSN of the transaction's commit record (``"0/16B3748"``)."""
    unchanged: tuple[str, ...] = ()
    """WAL capture: columns of ``new`` whose TOASTed value did not change and that the WAL
    did not carry -- absent from ``new``, never shown as NULL."""


@dataclass(frozen=True, slots=True)
class ChangeLag:
    changes: int
    """Changes committed that the consumer has not finished with."""
    seconds: float
    """Age of the oldest of them (0 when there are none)."""


_load = json.JSONDecoder().raw_decode
"""jsonb's text output, parsed without ``json.loads``'s checks for surrounding space."""


def change_from_row(key: str, row: Sequence[Any]) -> Change[Any]:
    """A ``Change`` from a log row as the ``_columns`` fragment of queries.sql selects it."""
    _id, txid, op, pk, new, old, at = row
    return new_change(
        int(_id),
        str(op),
        key,
        None if new is None else _load(new)[0],
        None if old is None else _load(old)[0],
        at,
        int(txid),
        None if pk is None else _load(pk)[0],
        None,
        (),
    )


def committed_id(item: object) -> int:
    """The id of a change a checkpoint is told to commit (a change stream's checkpoint
    commits its own changes only)."""
    if not isinstance(item, Change):
        raise TypeError(f"a change stream's checkpoint commits changes, not {item!r}")
    return item.id


def change_document(change: Change[Any]) -> dict[str, Any]:
    """A change as a JSON document (``at`` in ISO 8601): what ``pgstreams tail --json``
    prints and the NATS sink sends."""
    return {
        "id": change.id,
        "op": change.op,
        "table": change.table,
        "new": change.new,
        "old": change.old,
        "at": change.at.isoformat(),
        "txid": change.txid,
        "pk": None if change.pk is None else dict(change.pk),
        "lsn": change.lsn,
        "unchanged": list(change.unchanged),
    }


_FIELDS = ("id", "op", "table", "new", "old", "at", "txid", "pk", "lsn", "unchanged")
assert tuple(f.name for f in fields(Change)) == _FIELDS
_set_id, _set_op, _set_table, _set_new, _set_old, _set_at, _set_txid, _set_pk, _set_lsn, _set_un = (
    getattr(Change, name).__set__ for name in _FIELDS
)
_object_new = object.__new__


def new_change(
    id: int,
    op: str,
    table: str,
    new: Any,
    old: Any,
    at: datetime,
    txid: int,
    pk: Mapping[str, Any] | None,
    lsn: str | None,
    unchanged: tuple[str, ...],
) -> Change[Any]:
    """``Change(...)`` for a hot path: the same frozen object, its slots filled by their own
    setters rather than by ``__init__``'s ``object.__setattr__`` per field (half the cost;
    the WAL reader makes one per change)."""
    change: Change[Any] = _object_new(Change)
    _set_id(change, id)
    _set_op(change, op)
    _set_table(change, table)
    _set_new(change, new)
    _set_old(change, old)
    _set_at(change, at)
    _set_txid(change, txid)
    _set_pk(change, pk)
    _set_lsn(change, lsn)
    _set_un(change, unchanged)
    return change

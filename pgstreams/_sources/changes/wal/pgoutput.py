"""The streaming replication protocol's copy messages and pgoutput's logical messages
(protocol version 1), decoded from bytes into small records. Pure: no I/O.

Reference: PostgreSQL's "Streaming Replication Protocol" and "Logical Replication Message
Formats". Only what a version-1 stream without ``streaming``/``binary`` can carry is
decoded; anything else is a ``ProtocolError``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

__all__ = [
    "Begin",
    "Column",
    "Commit",
    "Delete",
    "Insert",
    "Keepalive",
    "LogicalMessage",
    "Message",
    "Origin",
    "ProtocolError",
    "Relation",
    "Truncate",
    "Tuple",
    "TypeInfo",
    "Update",
    "XLogData",
    "commit_end",
    "decode",
    "decode_copy",
    "format_lsn",
    "parse_lsn",
    "pg_time",
    "standby_status",
]

PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)

UNCHANGED = object()
"""A tuple value pgoutput left out: an unchanged TOASTed column."""


class ProtocolError(Exception):
    """Bytes that are not a message this decoder knows."""


def parse_lsn(text: str) -> int:
    """``"16/B374D848"`` -> an int."""
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) + int(low, 16)


def format_lsn(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def pg_time(micros: int) -> datetime:
    """A timestamp in microseconds since 2000-01-01 UTC."""
    return PG_EPOCH + timedelta(microseconds=micros)


def standby_status(written: int, flushed: int, now: datetime, *, reply: bool = False) -> bytes:
    """A Standby status update ('r'): ``flushed`` is the position the slot may confirm."""
    micros = (now - PG_EPOCH) // timedelta(microseconds=1)
    return b"r" + struct.pack("!QQQqB", written, flushed, flushed, micros, reply)


# -- the copy stream ---------------------------------------------------------------------


class XLogData(NamedTuple):
    start: int
    """The WAL position of the record this data came from."""
    end: int
    """The server's WAL end when it sent this."""
    payload: bytes


class Keepalive(NamedTuple):
    end: int
    """Everything before this WAL position has been sent."""
    reply: bool
    """The server asks for a status update now."""


_XLOG = struct.Struct("!QQq")
_KEEPALIVE = struct.Struct("!QqB")


def decode_copy(data: bytes | memoryview) -> XLogData | Keepalive:
    """One CopyData message of a START_REPLICATION stream."""
    try:
        return _decode_copy(data)
    except (struct.error, IndexError) as exc:
        raise ProtocolError(f"copy message ends early: {exc}") from None


def _decode_copy(data: bytes | memoryview) -> XLogData | Keepalive:
    kind = data[:1]
    if kind == b"w":
        start, end, _ = _XLOG.unpack_from(data, 1)
        return XLogData(start, end, bytes(data[1 + _XLOG.size :]))
    if kind == b"k":
        end, _, reply = _KEEPALIVE.unpack_from(data, 1)
        return Keepalive(end, bool(reply))
    raise ProtocolError(f"unexpected copy message {bytes(kind)!r}")


# -- pgoutput ----------------------------------------------------------------------------


class Begin(NamedTuple):
    final_lsn: int
    """The LSN of the transaction's commit record."""
    commit_time: datetime
    xid: int


class Commit(NamedTuple):
    commit_lsn: int
    end_lsn: int
    """Just past the commit record: the position to confirm once it is handled."""
    commit_time: datetime


@dataclass(frozen=True, slots=True)
class Origin:
    lsn: int
    name: str


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    type_oid: int
    type_mod: int
    key: bool
    """Part of the replica identity."""


@dataclass(frozen=True, slots=True)
class Relation:
    oid: int
    schema: str
    name: str
    replica_identity: str
    """"d" default (primary key), "n" nothing, "f" full, "i" an index."""
    columns: tuple[Column, ...]


@dataclass(frozen=True, slots=True)
class TypeInfo:
    oid: int
    schema: str
    name: str


Tuple = tuple[str | object | None, ...]
"""Column values in the relation's order: text, None (NULL) or UNCHANGED."""


class Insert(NamedTuple):
    relation: int
    new: Tuple


class Update(NamedTuple):
    relation: int
    old_kind: str | None
    """"K" key columns, "O" the whole old row, None: no old tuple was sent."""
    old: Tuple | None
    new: Tuple


class Delete(NamedTuple):
    relation: int
    old_kind: str
    old: Tuple


@dataclass(frozen=True, slots=True)
class Truncate:
    relations: tuple[int, ...]
    cascade: bool
    restart_identity: bool


@dataclass(frozen=True, slots=True)
class LogicalMessage:
    transactional: bool
    lsn: int
    prefix: str
    content: bytes


Message = (
    Begin | Commit | Origin | Relation | TypeInfo | Insert | Update | Delete | Truncate
) | LogicalMessage

_BEGIN = struct.Struct("!QqI")
_COMMIT = struct.Struct("!BQQq")
_I32 = struct.Struct("!I")
_I16 = struct.Struct("!H")
_COL = struct.Struct("!Ii")


class _Reader:
    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes) -> None:
        self.buf = buf
        self.pos = 0

    def byte(self) -> str:
        if self.pos >= len(self.buf):
            raise ProtocolError("message ends early")
        b = self.buf[self.pos]
        self.pos += 1
        return chr(b)

    def u8(self) -> int:
        return ord(self.byte())

    def u16(self) -> int:
        (v,) = _I16.unpack_from(self.buf, self.pos)
        self.pos += 2
        return int(v)

    def u32(self) -> int:
        (v,) = _I32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return int(v)

    def u64(self) -> int:
        (v,) = struct.unpack_from("!Q", self.buf, self.pos)
        self.pos += 8
        return int(v)

    def string(self) -> str:
        end = self.buf.find(b"\0", self.pos)
        if end < 0:
            raise ProtocolError("unterminated string")
        text = self.buf[self.pos : end].decode()
        self.pos = end + 1
        return text

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.buf):
            raise ProtocolError("message ends early")
        chunk = self.buf[self.pos : self.pos + n]
        self.pos += n
        return chunk


def _tuple(buf: bytes, pos: int) -> tuple[Tuple, int]:
    """TupleData at ``pos``: (values, position after it). The hot path: as few calls per
    column as can be."""
    count = (buf[pos] << 8) | buf[pos + 1]
    pos += 2
    values: list[str | object | None] = []
    append = values.append
    length_at = _I32.unpack_from
    for _ in range(count):
        kind = buf[pos]
        if kind == 116:  # 't'
            (length,) = length_at(buf, pos + 1)
            pos += 5
            append(buf[pos : pos + length].decode())
            pos += length
        elif kind == 110:  # 'n'
            append(None)
            pos += 1
        elif kind == 117:  # 'u'
            append(UNCHANGED)
            pos += 1
        else:
            raise ProtocolError(f"unexpected tuple value kind {chr(kind)!r}")
    if pos > len(buf):
        raise ProtocolError("message ends early")
    return tuple(values), pos


def decode(data: bytes | memoryview) -> Message:
    """One pgoutput message."""
    payload = bytes(data)
    try:
        kind = payload[0]
        if kind == 73:  # 'I': the most frequent, decoded inline
            if payload[5] != 78:
                raise ProtocolError("insert without a new tuple")
            return Insert(_I32.unpack_from(payload, 1)[0], _tuple(payload, 6)[0])
        if kind == 85 or kind == 68:  # 'U', 'D'
            return _update_or_delete(payload, kind)
        return _decode(payload)
    except (struct.error, IndexError) as exc:
        raise ProtocolError(f"message ends early: {exc}") from None


def _update_or_delete(payload: bytes, kind: int) -> Message:
    rel = _I32.unpack_from(payload, 1)[0]
    marker = payload[5]
    old_kind: str | None = None
    old: Tuple | None = None
    pos = 6
    if marker in (75, 79):  # 'K', 'O'
        old_kind = chr(marker)
        old, pos = _tuple(payload, 6)
        if kind == 68:
            if pos != len(payload):
                raise ProtocolError("trailing bytes after a delete")
            return Delete(rel, old_kind, old)
        marker = payload[pos]
        pos += 1
    elif kind == 68:
        raise ProtocolError("delete without an old tuple")
    if marker != 78:
        raise ProtocolError("update without a new tuple")
    return Update(rel, old_kind, old, _tuple(payload, pos)[0])


def commit_end(payload: bytes) -> int:
    """The end LSN of a Commit message (without decoding the rest of it)."""
    try:
        return int(_COMMIT.unpack_from(payload, 1)[2])
    except struct.error as exc:
        raise ProtocolError(f"message ends early: {exc}") from None


def _decode(payload: bytes) -> Message:
    r = _Reader(payload)
    kind = r.byte()
    if kind == "B":
        final_lsn, ts, xid = _BEGIN.unpack_from(payload, 1)
        return Begin(final_lsn, pg_time(ts), xid)
    if kind == "C":
        _flags, commit_lsn, end_lsn, ts = _COMMIT.unpack_from(payload, 1)
        return Commit(commit_lsn, end_lsn, pg_time(ts))
    if kind == "R":
        oid = r.u32()
        schema, name = r.string(), r.string()
        ident = r.byte()
        columns = []
        for _ in range(r.u16()):
            flags = r.u8()
            col = r.string()
            type_oid, type_mod = _COL.unpack_from(payload, r.pos)
            r.pos += _COL.size
            columns.append(Column(col, type_oid, type_mod, bool(flags & 1)))
        return Relation(oid, schema, name, ident, tuple(columns))
    if kind == "T":
        count = r.u32()
        options = r.u8()
        rels = tuple(r.u32() for _ in range(count))
        return Truncate(rels, bool(options & 1), bool(options & 2))
    if kind == "M":
        flags = r.u8()
        lsn = r.u64()
        prefix = r.string()
        content = r.take(r.u32())
        return LogicalMessage(bool(flags & 1), lsn, prefix, content)
    if kind == "Y":
        oid = r.u32()
        return TypeInfo(oid, r.string(), r.string())
    if kind == "O":
        lsn = r.u64()
        return Origin(lsn, r.string())
    raise ProtocolError(f"unexpected pgoutput message {kind!r}")

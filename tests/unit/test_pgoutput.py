"""The WAL decoder (copy messages, pgoutput v1) and the text -> to_jsonb-like value conversions.

Messages are built by hand from PostgreSQL's "Streaming Replication Protocol" and "Logical
Replication Message Formats": network byte order, strings NUL-terminated.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from pgstreams._sources.changes.wal import pgoutput as po
from pgstreams._sources.changes.wal.values import Types, parse_array

JAN_2024 = 757_382_400_123_456
"""2024-01-01 00:00:00.123456 UTC in microseconds since 2000-01-01."""
JAN_2024_DT = datetime(2024, 1, 1, 0, 0, 0, 123456, tzinfo=UTC)
REL = 0xFFFF_FFF0  # OIDs are unsigned 32-bit
INS1 = b"I" + struct.pack("!I", 1) + b"N"  # an Insert into relation 1, before its tuple


def cstr(text: str) -> bytes:
    return text.encode() + b"\0"


def txt(text: str) -> bytes:
    data = text.encode()
    return b"t" + struct.pack("!I", len(data)) + data


def tup(*cols: bytes) -> bytes:
    return struct.pack("!H", len(cols)) + b"".join(cols)


@pytest.mark.parametrize(
    ("text", "lsn"),
    [("0/0", 0), ("0/1", 1), ("16/B374D848", 0x16_B374_D848), ("FFFFFFFF/FFFFFFFF", 2**64 - 1)],
)
def test_lsn_text_round_trip(text: str, lsn: int) -> None:
    assert po.parse_lsn(text) == lsn
    assert po.parse_lsn(text.lower()) == lsn
    assert po.format_lsn(lsn) == text


def test_pg_time_counts_microseconds_from_2000_utc() -> None:
    assert po.pg_time(0) == datetime(2000, 1, 1, tzinfo=UTC)
    assert po.pg_time(-1) == datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
    assert po.pg_time(JAN_2024) == JAN_2024_DT
    assert po.pg_time(JAN_2024).utcoffset() == timedelta(0)


@pytest.mark.parametrize("reply", [False, True])
def test_standby_status_layout(reply: bool) -> None:
    now = datetime(2000, 1, 1, 2, 0, 1, 500000, tzinfo=timezone(timedelta(hours=2)))
    msg = po.standby_status(0x10, 0x20, now, reply=reply)
    # 'r', written, flushed, applied, clock (µs since 2000-01-01 UTC), reply
    assert msg == b"r" + struct.pack("!QQQqB", 0x10, 0x20, 0x20, 1_500_000, reply)
    assert len(msg) == 34


def test_copy_xlogdata_and_keepalive() -> None:
    raw = b"w" + struct.pack("!QQq", 0x1_0000_0002, 0x3_0000_0004, JAN_2024) + b"B\0payload"
    x = po.decode_copy(memoryview(raw))
    assert isinstance(x, po.XLogData)
    assert (x.start, x.end) == (0x1_0000_0002, 0x3_0000_0004)
    assert bytes(x.payload) == b"B\0payload"  # a view: no copy on the hot path
    for flag in (0, 1):
        k = po.decode_copy(b"k" + struct.pack("!QqB", 0xABCD_0000_0001, JAN_2024, flag))
        assert k == po.Keepalive(0xABCD_0000_0001, bool(flag))
        assert type(k.reply) is bool
    with pytest.raises(po.ProtocolError):
        po.decode_copy(b"r" + bytes(33))


def test_begin_commit_origin_type() -> None:
    begin = po.decode(b"B" + struct.pack("!QqI", 0x5_0000_0010, JAN_2024, 0xFFFF_FFFE))
    assert begin == po.Begin(0x5_0000_0010, JAN_2024_DT, 0xFFFF_FFFE)
    commit = po.decode(b"C" + struct.pack("!BQQq", 0, 0x5_0000_0010, 0x5_0000_0040, JAN_2024))
    assert commit == po.Commit(0x5_0000_0010, 0x5_0000_0040, JAN_2024_DT)
    origin = po.decode(b"O" + struct.pack("!Q", 0x7_0000_0001) + cstr("node_a"))
    assert origin == po.Origin(0x7_0000_0001, "node_a")
    typ = po.decode(b"Y" + struct.pack("!I", 16_500) + cstr("public") + cstr("mood"))
    assert typ == po.TypeInfo(16_500, "public", "mood")


def test_relation() -> None:
    raw = b"R" + struct.pack("!I", REL) + cstr("") + cstr("tbl") + b"i" + struct.pack("!H", 3)
    raw += b"\x01" + cstr("id") + struct.pack("!Ii", 20, -1)
    raw += b"\x00" + cstr("naïve") + struct.pack("!Ii", 1043, 260)
    raw += b"\x00" + cstr("x") + struct.pack("!Ii", 0xFFFF_FFF1, 7)
    columns = (
        po.Column("id", 20, -1, True),
        po.Column("naïve", 1043, 260, False),
        po.Column("x", 0xFFFF_FFF1, 7, False),
    )
    assert po.decode(raw) == po.Relation(REL, "", "tbl", "i", columns)


def test_insert_tuple_values() -> None:
    raw = b"I" + struct.pack("!I", REL) + b"N"
    raw += tup(txt("42"), b"n", b"u", txt(""), txt("é\0x"))
    msg = po.decode(raw)
    assert isinstance(msg, po.Insert)
    assert msg.relation == REL
    assert msg.new[:2] == ("42", None)
    assert msg.new[2] is po.UNCHANGED
    assert msg.new[3:] == ("", "é\0x")
    assert po.decode(INS1 + tup()) == po.Insert(1, ())


@pytest.mark.parametrize("old_kind", [None, "K", "O"])
def test_update(old_kind: str | None) -> None:
    raw = b"U" + struct.pack("!I", REL)
    if old_kind is not None:
        raw += old_kind.encode() + tup(txt("1"), b"n")
    raw += b"N" + tup(txt("2"), b"u")
    old = None if old_kind is None else ("1", None)
    assert po.decode(raw) == po.Update(REL, old_kind, old, ("2", po.UNCHANGED))


@pytest.mark.parametrize("old_kind", ["K", "O"])
def test_delete(old_kind: str) -> None:
    raw = b"D" + struct.pack("!I", REL) + old_kind.encode() + tup(txt("7"), b"n")
    assert po.decode(raw) == po.Delete(REL, old_kind, ("7", None))


@pytest.mark.parametrize(
    ("options", "cascade", "restart"),
    [(0, False, False), (1, True, False), (2, False, True), (3, True, True)],
)
def test_truncate(options: int, cascade: bool, restart: bool) -> None:
    raw = b"T" + struct.pack("!IBIII", 3, options, 16_384, REL, 1)
    assert po.decode(raw) == po.Truncate((16_384, REL, 1), cascade, restart)


@pytest.mark.parametrize("flags", [0, 1])
def test_logical_message(flags: int) -> None:
    content = b"\x00\xffhi"
    raw = b"M" + struct.pack("!BQ", flags, 0x2_0000_0003) + cstr("pgstreams")
    raw += struct.pack("!I", len(content)) + content
    msg = po.decode(raw)
    assert msg == po.LogicalMessage(bool(flags), 0x2_0000_0003, "pgstreams", content)
    assert isinstance(msg, po.LogicalMessage) and type(msg.content) is bytes


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"X", id="unknown-kind"),
        pytest.param(b"S" + bytes(20), id="stream-start"),
        pytest.param(b"I" + struct.pack("!I", 1) + b"K" + tup(), id="insert-not-N"),
        pytest.param(b"U" + struct.pack("!I", 1) + b"K" + tup() + b"X" + tup(), id="update-not-N"),
        pytest.param(b"D" + struct.pack("!I", 1) + b"N" + tup(), id="delete-not-K-O"),
        pytest.param(INS1 + tup(b"b" + bytes(4)), id="binary"),
        pytest.param(INS1 + tup(b"t\0\0\0\x05ab"), id="short-text"),
        pytest.param(INS1 + struct.pack("!H", 2) + b"n", id="cols"),
        pytest.param(b"Y" + struct.pack("!I", 1) + cstr("s") + b"no-nul", id="unterminated"),
    ],
)
def test_bad_messages_are_protocol_errors(raw: bytes) -> None:
    with pytest.raises(po.ProtocolError):
        po.decode(raw)


@pytest.mark.parametrize(
    ("decoder", "raw"),
    [
        pytest.param(po.decode, b"B\0", id="begin"),
        pytest.param(po.decode, b"C" + bytes(10), id="commit"),
        pytest.param(po.decode, b"I\0\0", id="relation-oid"),
        pytest.param(po.decode, INS1 + b"\0", id="column-count"),
        pytest.param(po.decode, INS1 + tup(b"t\0\0"), id="text-length"),
        pytest.param(po.decode, b"O\0\0", id="origin"),
        pytest.param(po.decode, b"M\1\0", id="message-lsn"),
        pytest.param(po.decode, b"T" + struct.pack("!IBI", 2, 0, 1), id="truncate-oids"),
        pytest.param(po.decode, b"R\0\0\0\1s\0t\0d\0\1\0c\0\0", id="relation-column-type"),
        pytest.param(po.decode_copy, b"w" + bytes(10), id="xlogdata"),
        pytest.param(po.decode_copy, b"k" + bytes(10), id="keepalive"),
    ],
)
def test_truncated_fixed_width_fields(decoder: Callable[[bytes], object], raw: bytes) -> None:
    with pytest.raises(po.ProtocolError):
        decoder(raw)


# -- values ------------------------------------------------------------------------------


def same(got: Any, expected: Any) -> bool:
    """Equal, and of the same types all the way down (1 == 1.0 == True is not enough)."""
    return bool(got == expected) and repr(got) == repr(expected)


def convert(oid: int) -> Any:
    return Types().converter(oid)


@pytest.mark.parametrize(
    ("text", "oid", "expected"),
    [
        ("{}", 23, []),
        ("{1,-2,3}", 23, [1, -2, 3]),
        ('{"a b","x\\"y","back\\\\slash",""}', 25, ["a b", 'x"y', "back\\slash", ""]),
        ('{NULL,"NULL","null"}', 25, [None, "NULL", "null"]),
        ("{{1,2},{3,NULL}}", 21, [[1, 2], [3, None]]),
        ("[0:1]={7,8}", 20, [7, 8]),
        ("[0:1][2:2]={{1},{2}}", 23, [[1], [2]]),
        ("{t,f,NULL}", 16, [True, False, None]),
        ("{1.5,NaN,-Infinity}", 701, [1.5, "NaN", "-Infinity"]),
        ('{"{\\"a\\": [1, null]}",NULL}', 3802, [{"a": [1, None]}, None]),
        ('{"2024-01-02 03:04:05+00",infinity}', 1184, ["2024-01-02T03:04:05+00:00", "infinity"]),
        ('{"{}",x}', 25, ["{}", "x"]),
    ],
)
def test_parse_array(text: str, oid: int, expected: list[Any]) -> None:
    assert same(parse_array(text, convert(oid)), expected)


@pytest.mark.parametrize("text", ["{1}x", "1,2}", "{{1}x}", '{"a"x}'])
def test_parse_array_rejects_malformed(text: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011
        parse_array(text, str)


def test_parse_array_box_delimiter() -> None:
    assert parse_array("{(1,1),(0,0);(2,2),(1,1)}", str, ";") == ["(1,1),(0,0)", "(2,2),(1,1)"]


@pytest.mark.parametrize("text", ["{1,2", "{", '{"a'])
def test_parse_array_rejects_unterminated(text: str) -> None:
    with pytest.raises(ValueError, match="unterminated"):
        parse_array(text, str)


# Expected: json.loads(to_jsonb(value)::text), checked against a PostgreSQL 15 server.
@pytest.mark.parametrize(
    ("oid", "text", "expected"),
    [
        (16, "t", True),
        (16, "f", False),
        (20, "9223372036854775807", 9223372036854775807),
        (21, "-32768", -32768),
        (23, "42", 42),
        (700, "1.5", 1.5),
        (701, "-0.25", -0.25),
        (701, "1e-05", 1e-05),
        (1700, "1.50", 1.5),
        (1700, "12345678901234567890", 12345678901234567890),
        (700, "NaN", "NaN"),
        (701, "Infinity", "Infinity"),
        (701, "-Infinity", "-Infinity"),
        (1700, "NaN", "NaN"),
        (114, '{"a": [1, null], "b": 2.5}', {"a": [1, None], "b": 2.5}),
        (3802, '"s"', "s"),
        (3802, "null", None),
        (1114, "2024-01-02 03:04:05.123456", "2024-01-02T03:04:05.123456"),
        (1114, "infinity", "infinity"),
        (1114, "-infinity", "-infinity"),
        (1114, "0044-03-15 12:00:00 BC", "0044-03-15T12:00:00 BC"),
        (1184, "2024-01-02 03:04:05+00", "2024-01-02T03:04:05+00:00"),
        (1184, "2024-01-02 03:04:05.5-08", "2024-01-02T03:04:05.5-08:00"),
        (1184, "2024-01-02 08:34:05.5+05:30", "2024-01-02T08:34:05.5+05:30"),
        (1184, "1900-01-01 00:00:00+05:21:10", "1900-01-01T00:00:00+05:21:10"),
        (1184, "infinity", "infinity"),
        (1266, "12:34:56+05:30", "12:34:56+05:30"),
        (25, "plain  text", "plain  text"),
        (1082, "2024-01-02", "2024-01-02"),
        (1186, "1 day 02:00:00", "1 day 02:00:00"),
        (999_999, "42", "42"),  # unknown type: its text form
        (1266, "12:34:56+00", "12:34:56+00"),  # to_jsonb: timetz's text form
        pytest.param(701, "1e+15", 10**15, id="float8-1e+15"),  # floats go through numeric
        pytest.param(700, "1e+10", 10**10, id="float4-1e+10"),
        pytest.param(701, "1.5e+300", 15 * 10**299, id="float8-1.5e+300"),
    ],
)
def test_converter(oid: int, text: str, expected: Any) -> None:
    assert same(convert(oid)(text), expected)


def test_types_knows_builtins_only() -> None:
    assert Types().knows([16, 20, 21, 23, 25, 114, 700, 701, 1114, 1184, 1266, 1700, 3802])
    assert not Types().knows([23, 999_999])


# -- the reader's insert fast path --------------------------------------------------------


def _rel(*names: str) -> Any:
    from pgstreams._sources.changes.wal.reader import _Rel

    return _Rel("public.t", names, tuple(convert(23) for _ in names), (0,), (0,))


def test_insert_fast_path_matches_the_general_decoder() -> None:
    from pgstreams._sources.changes.wal.reader import _insert_row, _row

    raw = INS1 + tup(b"t" + struct.pack("!I", 2) + b"42", b"n", b"u")
    rel = _rel("a", "b", "c")
    unchanged: list[str] = []
    insert = po.decode(raw)
    assert isinstance(insert, po.Insert)
    assert _insert_row(raw, rel) == (_row(rel, insert.new, unchanged), ("c",))
    assert unchanged == ["c"]
    assert _insert_row(raw, rel)[0] == {"a": 42, "b": None}


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(INS1 + tup(b"t" + struct.pack("!I", 9) + b"42"), id="short-text"),
        pytest.param(INS1 + struct.pack("!H", 2) + b"n", id="too-few"),
        pytest.param(INS1 + tup(b"n", b"n", b"n", b"n"), id="too-many"),
        pytest.param(INS1 + tup(b"b"), id="binary"),
    ],
)
def test_insert_fast_path_rejects_bad_tuples(raw: bytes) -> None:
    from pgstreams._sources.changes.wal.reader import _insert_row

    with pytest.raises(po.ProtocolError):
        _insert_row(raw, _rel("a", "b", "c"))


def test_new_change_is_the_same_frozen_change() -> None:
    import dataclasses
    from datetime import UTC, datetime

    from pgstreams._sources.changes.change import Change, new_change

    at = datetime(2024, 1, 2, tzinfo=UTC)
    args = (7, "insert", "public.t", {"id": 1}, None, at, 9, {"id": 1}, "0/1", ("b",))
    made = new_change(*args)
    assert type(made) is Change and made == Change(*args) and hash(made.at) == hash(at)
    assert [getattr(made, f.name) for f in dataclasses.fields(Change)] == list(args)
    with pytest.raises(dataclasses.FrozenInstanceError):
        made.op = "delete"  # type: ignore[misc]


def test_commit_end_reads_the_end_lsn_alone() -> None:
    raw = b"C" + struct.pack("!BQQq", 0, 0x10, 0x1_0000_0020, JAN_2024)
    commit = po.decode(raw)
    assert isinstance(commit, po.Commit)
    assert po.commit_end(raw) == commit.end_lsn == 0x1_0000_0020
    with pytest.raises(po.ProtocolError):
        po.commit_end(raw[:12])

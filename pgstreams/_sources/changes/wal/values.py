"""Column values from pgoutput's text form to the Python values trigger capture gives.

Trigger capture logs rows with ``to_jsonb`` and hands out ``json.loads`` of that, so a WAL
change must hold the same: numbers as int/float (NaN and infinities as strings), booleans,
json/jsonb parsed, timestamps in ISO 8601 with a ``T`` and a ``+HH:MM`` offset, arrays as
lists (of converted elements), everything else as its text form. Domains convert as their
base type. Composite values stay in their text form (``to_jsonb`` would give an object).

Which conversion a column needs is looked up once per type in ``pg_type``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from decimal import Decimal
from typing import Any

from psycopg import AsyncConnection

__all__ = ["Convert", "Types", "parse_array"]

Convert = Callable[[str], Any]


def _text(value: str) -> Any:
    return value


def _bool(value: str) -> Any:
    return value == "t"


def _int(value: str) -> Any:
    return int(value)


_NOT_JSON_NUMBERS = frozenset({"NaN", "Infinity", "-Infinity"})


def _number(value: str) -> Any:
    if value in _NOT_JSON_NUMBERS:
        return value
    if "e" in value:  # to_jsonb reads a float as numeric, which has no exponent
        return json.loads(format(Decimal(value), "f"))
    return json.loads(value)


def _json(value: str) -> Any:
    return json.loads(value)


def _hour_offset(value: str) -> bool:
    """The value ends in an offset of whole hours (``+00``, ``-08``), which ISO 8601 as
    ``to_jsonb`` writes it spells ``+00:00``."""
    return len(value) > 3 and value[-3] in "+-" and value[-2:].isdigit()


def _timestamp(value: str) -> Any:
    return value.replace(" ", "T", 1) if " " in value else value  # "infinity" stays


def _timestamptz(value: str) -> Any:
    if " " not in value:
        return value
    value = value.replace(" ", "T", 1)
    return value + ":00" if _hour_offset(value) else value


_SCALARS: dict[int, Convert] = {
    16: _bool,
    20: _int,
    21: _int,
    23: _int,
    700: _number,
    701: _number,
    1700: _number,
    114: _json,
    3802: _json,
    1114: _timestamp,
    1184: _timestamptz,
}
# Types whose text form is what to_jsonb gives, so no lookup is needed for them.
_TEXTUAL = (25, 1043, 1042, 19, 18, 2950, 1082, 1083, 1266, 17, 26, 1186, 869, 650, 829, 774)


def parse_array(text: str, element: Convert, delimiter: str = ",") -> Any:
    """An array literal (``{1,NULL,"a b"}``, nested, optionally ``[1:2]={...}``) as lists;
    ``delimiter`` is the element type's (``;`` for box)."""
    if text.startswith("["):
        text = text[text.index("=") + 1 :]
    try:
        value, end = _parse_level(text, 0, element, delimiter)
    except IndexError:
        raise ValueError(f"unterminated array literal {text!r}") from None
    if end != len(text):
        raise ValueError(f"trailing characters in array literal {text!r}")
    return value


def _parse_level(text: str, i: int, element: Convert, delim: str) -> tuple[list[Any], int]:
    if text[i] != "{":
        raise ValueError(f"malformed array literal {text!r}")
    i += 1
    out: list[Any] = []
    if text[i] == "}":
        return out, i + 1
    while True:
        if text[i] == "{":
            nested, i = _parse_level(text, i, element, delim)
            out.append(nested)
        elif text[i] == '"':
            i += 1
            chars: list[str] = []
            while text[i] != '"':
                if text[i] == "\\":
                    i += 1
                chars.append(text[i])
                i += 1
            i += 1
            out.append(element("".join(chars)))
        else:
            start = i
            while text[i] != delim and text[i] != "}":
                i += 1
            raw = text[start:i]
            out.append(None if raw.upper() == "NULL" else element(raw))
        if text[i] == delim:
            i += 1
            continue
        if text[i] == "}":
            return out, i + 1
        raise ValueError(f"malformed array literal {text!r}")


class Types:
    """Conversions by type OID, looked up in ``pg_type`` the first time a type is seen."""

    def __init__(self) -> None:
        self._known: dict[int, Convert] = dict(_SCALARS)
        self._known.update(dict.fromkeys(_TEXTUAL, _text))

    def converter(self, oid: int) -> Convert:
        return self._known.get(oid, _text)

    def knows(self, oids: Iterable[int]) -> bool:
        return all(o in self._known for o in oids)

    async def learn(self, conn: AsyncConnection[Any], oids: Iterable[int]) -> None:
        """Look up the types of ``oids`` not known yet (and what they are built on)."""
        rows: dict[int, tuple[str, int, int, str, str]] = {}
        wanted = {o for o in oids if o not in self._known}
        while wanted:
            cur = await conn.execute(
                "SELECT oid::int8, typtype::text, typbasetype::int8, typelem::int8,"
                " typcategory::text, typdelim::text FROM pg_catalog.pg_type WHERE oid = ANY(%s)",
                [sorted(wanted)],
            )
            found = await cur.fetchall()
            for oid, typtype, base, elem, category, delim in found:
                rows[int(oid)] = (str(typtype), int(base), int(elem), str(category), str(delim))
            wanted = set()
            for typtype, base, elem, _, _ in rows.values():
                for dep in (base if typtype == "d" else 0, elem):
                    if dep and dep not in self._known and dep not in rows:
                        wanted.add(dep)
            missing = {o for o in oids if o not in self._known and o not in rows}
            for oid in missing:  # dropped since: keep its text form
                self._known[oid] = _text
        for oid in list(rows):
            self._resolve(oid, rows)

    def _resolve(self, oid: int, rows: dict[int, tuple[str, int, int, str, str]]) -> Convert:
        known = self._known.get(oid)
        if known is not None:
            return known
        if oid not in rows:
            return _text
        typtype, base, elem, category, _ = rows[oid]
        if typtype == "d":
            convert = self._resolve(base, rows)
        elif category == "A" and elem:
            item = self._resolve(elem, rows)
            delim = rows[elem][4] if elem in rows else ","
            convert = lambda text: parse_array(text, item, delim)  # noqa: E731
        else:
            convert = _text
        self._known[oid] = convert
        return convert

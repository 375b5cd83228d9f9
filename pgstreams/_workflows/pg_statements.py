"""The statements of PgWorkflowStorage (``queries.sql``), and how calls share them.

Calls of the shared kinds (create, claim, attempt, mark, finish) are items: tuples that
become the rows of the statement's batch parameter -- a jsonb array the driver's adapter
serialises, or text arrays -- so that any text (quotes, backslashes, control characters,
any script) reaches the server escaped by a serialiser, and JSON values as the JSON text
``to_json`` made. Two items that change the same row never share a statement
(``Batch.key``).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Hashable, Mapping
from typing import Any, NamedTuple, cast

from psycopg import sql
from psycopg.types.json import Jsonb

from .._core.errors import InvalidArgumentError
from .._pg import queries
from .run_session import Batch
from .storage import RunRecord

__all__ = [
    "BATCHES",
    "CreateItem",
    "FinishItem",
    "MarkItem",
    "attempt_params",
    "check_text",
    "mark_params",
    "run_record",
    "statements",
]


def statements(names: Mapping[str, sql.Composable]) -> dict[str, bytes]:
    """Every statement, rendered for one storage's tables."""
    return queries.render(queries.load(__package__), names)


class CreateItem(NamedTuple):
    workflow_id: str
    workflow: str
    input: str  # JSON text


class MarkItem(NamedTuple):
    workflow_id: str
    name: str
    status: str
    attempt: int | None
    output: str | None  # JSON text
    error: str | None  # JSON text


class FinishItem(NamedTuple):
    workflow_id: str
    status: str
    owner: str
    output: str | None  # JSON text
    error: str | None  # JSON text
    key: int  # the run lock's key, let go by the statement


_dumps = functools.partial(json.dumps, ensure_ascii=False, separators=(",", ":"))
"""JSON as compact as the server reads it. Not ASCII-only: a \\u escape above ASCII is
refused by a database whose encoding is not UTF8 (SQL_ASCII), where the text itself is
stored as it comes."""


def _objects(*keys: str) -> Callable[[Hashable, list[Any]], dict[str, Any]]:
    """Parameters for a shared statement: a jsonb array of the items, each an object with
    its i-th field under ``keys[i]`` (the statement's jsonb_to_recordset columns)."""

    def params(group: Hashable, items: list[Any]) -> dict[str, Any]:
        rows = [dict(zip(keys, item, strict=True)) for item in items]
        return {"batch": Jsonb(rows, dumps=_dumps)}

    return params


def attempt_params(group: Hashable, items: list[Any]) -> dict[str, Any]:
    return {"ids": [i for i, _ in items], "names": [n for _, n in items]}


mark_params = _objects("i", "n", "s", "a", "o", "e")


def _create_split(items: list[Any], rows: list[Any]) -> list[Any]:
    created = {r[0]: r for r in rows}
    return [created.get(item.workflow_id) for item in items]


def _no_results(items: list[Any], rows: list[Any]) -> list[Any]:
    return [None] * len(items)


def _finish_split(items: list[Any], rows: list[Any]) -> list[Any]:
    updated = {r[0]: bool(r[1]) for r in rows}
    return [updated[item.workflow_id] for item in items]


def _claim_params(group: Hashable, items: list[Any]) -> dict[str, Any]:
    owner, workflows, lease, ns = cast(tuple[str, tuple[str, ...], float, str], group)
    return {"owner": owner, "workflows": list(workflows), "lease": lease, "ns": ns, "n": len(items)}


def _claim_split(items: list[Any], rows: list[Any]) -> list[Any]:
    return list(rows) + [None] * (len(items) - len(rows))


def _attempt_split(items: list[Any], rows: list[Any]) -> list[Any]:
    attempts = {(r[0], r[1]): r[2] for r in rows}
    return [attempts[item] for item in items]


def _first(item: tuple[Any, ...]) -> Hashable:
    return cast(Hashable, item[0])


def _step(item: tuple[Any, ...]) -> Hashable:
    return (item[0], item[1])


BATCHES = {
    "create": Batch(_objects("i", "w", "n"), _create_split, key=_first),
    "claim": Batch(_claim_params, _claim_split, alone_on_failure=False),
    "attempt": Batch(attempt_params, _attempt_split, key=_step),
    "mark": Batch(mark_params, _no_results, key=_step),
    "finish": Batch(_objects("i", "s", "w", "o", "e", "k"), _finish_split, key=_first),
}


def run_record(row: Any) -> RunRecord:
    return RunRecord(*row[:11])  # the columns of _run, in RunRecord's field order


def check_text(what: str, value: str) -> str:
    """``value`` if PostgreSQL can store it as text: a lone surrogate (say, from
    ``os.fsdecode``) cannot be encoded, and is refused before anything is written."""
    if not isinstance(value, str):
        raise InvalidArgumentError(f"{what} must be a str, got {type(value).__name__}")
    if not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError as exc:
            raise InvalidArgumentError(f"{what} {value!r} is not valid Unicode: {exc}") from exc
    return value

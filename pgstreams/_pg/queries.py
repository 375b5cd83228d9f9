"""SQL as data: named blocks in packaged ``.sql`` files, parsed once, rendered once per object.

A file holds blocks, each introduced by a ``-- name: NAME`` line and running to the next one::

    -- name: publish
    -- One notification per statement however many rows it inserts.
    INSERT INTO {table} (payload) VALUES (%(payload)s::jsonb) RETURNING id;

``{name}`` placeholders are identifiers (or other composables) filled in with ``psycopg.sql``;
values are always ``%(name)s`` parameters, so a literal ``{`` is written ``{{``. A block whose
name starts with ``_`` is a fragment: it is rendered first and may be used by other blocks as
``{_name}``. Whole-line ``--`` comments document the file and are not sent to the server (so a
comment can never swallow the rest of a line a fragment is inserted into, and a ``%`` in one is
not taken for a parameter).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from importlib import resources

from psycopg import sql

__all__ = ["load", "render"]

_HEADER = re.compile(r"^--\s*name:\s*(\w+)\s*$")
_FRAGMENT_REF = re.compile(r"\{(_\w+)\}")


def parse(text: str, *, where: str = "<sql>") -> dict[str, str]:
    """The named blocks of ``text``, in file order (a trailing ``;`` is dropped)."""
    blocks: dict[str, list[str]] = {}
    current: list[str] | None = None
    for number, line in enumerate(text.splitlines(), 1):
        match = _HEADER.match(line)
        if match:
            name = match[1]
            if name in blocks:
                raise ValueError(f"{where}:{number}: block {name!r} is defined twice")
            current = blocks[name] = []
        elif current is not None:
            if not line.lstrip().startswith("--"):
                current.append(line)
        elif line.strip() and not line.lstrip().startswith("--"):
            raise ValueError(f"{where}:{number}: SQL outside a named block")
    out = {}
    for name, lines in blocks.items():
        body = "\n".join(lines).strip().removesuffix(";").rstrip()
        if not body:
            raise ValueError(f"{where}: block {name!r} is empty")
        out[name] = body
    return out


@functools.cache
def load(package: str, filename: str = "queries.sql") -> Mapping[str, str]:
    """The named blocks of ``filename`` in ``package`` (read and parsed once per process)."""
    text = resources.files(package).joinpath(filename).read_text("utf-8")
    return parse(text, where=f"{package}/{filename}")


def render(texts: Mapping[str, str], names: Mapping[str, sql.Composable]) -> dict[str, bytes]:
    """Each block with its ``{name}`` placeholders filled in, as ready bytes for the driver.

    Fragments (``_``-named blocks) are rendered first and offered to the other blocks under
    their own names; they are not returned.
    """
    fragments: dict[str, sql.Composable] = {}

    def compose(key: str, seen: tuple[str, ...] = ()) -> sql.Composable:
        if key in seen:
            raise ValueError(f"SQL fragment {key!r} refers to itself")
        text = texts[key]
        inner = {
            ref: fragments.get(ref) or compose(ref, (*seen, key))
            for ref in _FRAGMENT_REF.findall(text)
        }
        return sql.SQL(text).format(**names, **inner)  # type: ignore[arg-type,unused-ignore]

    for key in texts:
        if key.startswith("_"):
            fragments[key] = compose(key)
    return {key: compose(key).as_string().encode() for key in texts if not key.startswith("_")}

"""One library schema's change log as the change-stream modules reach it: the database, the
statements of queries.sql rendered for that schema, and the trigger DDL templates."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from psycopg import sql

from ..._core.source import channel_for
from ..._pg import queries
from ..._pg.database import Database

__all__ = ["Log"]


@dataclass(frozen=True, slots=True)
class Log:
    db: Database
    sql: Mapping[str, bytes]
    """The statements, ready to send."""
    ddl: Mapping[str, str]
    """The ``ddl_`` blocks, composed per trigger (see queries.sql)."""

    @classmethod
    def of(cls, db: Database) -> Log:
        """Render the statements once (no I/O)."""
        blocks = queries.load(__package__)
        names = {
            "changes": sql.Identifier(db.schema, "changes"),
            "captures": sql.Identifier(db.schema, "change_captures"),
            "consumers": sql.Identifier(db.schema, "change_consumers"),
            "change_page": sql.Identifier(db.schema, "change_page"),
        }
        statements = {k: v for k, v in blocks.items() if not k.startswith("ddl_")}
        ddl = {k: v for k, v in blocks.items() if k.startswith("ddl_")}
        return cls(db, queries.render(statements, names), ddl)

    def channel(self, key: str) -> str:
        """The NOTIFY channel of the stream ``key``."""
        return channel_for(self.db.schema, "changes", key)

"""The named-block SQL loader: parsing, fragments, identifiers quoted by psycopg.sql."""

from __future__ import annotations

import pytest
from psycopg import sql

from pgstreams._pg.queries import parse, render

TEXT = """
-- SQL of a test.

-- name: _pick
SELECT id FROM {table} LIMIT %(n)s

-- name: take
-- Takes what _pick picks.
DELETE FROM {table} WHERE id = ANY(ARRAY({_pick})) RETURNING '{{}}'::jsonb;
"""


def test_blocks_are_parsed_in_order_without_the_trailing_semicolon() -> None:
    blocks = parse(TEXT)
    assert list(blocks) == ["_pick", "take"]
    assert blocks["take"].endswith("RETURNING '{{}}'::jsonb")


def test_comment_lines_are_not_sent() -> None:
    blocks = parse("-- name: a\n-- 100% of rows\nSELECT 1\n  -- trailing note\nFROM t\n")
    assert blocks == {"a": "SELECT 1\nFROM t"}


def test_fragments_are_rendered_into_blocks_and_identifiers_are_quoted() -> None:
    rendered = render(parse(TEXT), {"table": sql.Identifier("my schema", "q")})
    assert list(rendered) == ["take"]
    assert rendered["take"].decode() == (
        'DELETE FROM "my schema"."q" WHERE id = ANY(ARRAY(SELECT id FROM "my schema"."q" '
        "LIMIT %(n)s)) RETURNING '{}'::jsonb"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("SELECT 1", "outside a named block"),
        ("-- name: a\nSELECT 1\n-- name: a\nSELECT 2", "defined twice"),
        ("-- name: a\n-- only a comment\n", "is empty"),
    ],
)
def test_malformed_files_are_refused(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse(text)

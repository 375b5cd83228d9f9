"""``to_json``: the library's one JSON encoder (queue payloads, headers, change documents)
writes what ``json.dumps`` with its settings writes, and refuses what jsonb cannot store."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgstreams import PayloadError
from pgstreams._core.validate import to_json

_TEXT = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"))
_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | _TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_TEXT, inner, max_size=4),
    max_leaves=20,
)


@given(_JSON)
def test_it_writes_what_json_dumps_writes(value: Any) -> None:
    expected = json.dumps(value, separators=(",", ":"), allow_nan=False, ensure_ascii=False)
    assert to_json("value", value) == expected


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ({"x": float("nan")}, "Out of range float"),
        ({"x": object()}, "Object of type object is not JSON serializable"),
        ({(1, 2): 1}, "keys must be"),
        ("a\x00b", "NUL"),
        ({"k": "\ud800"}, "not valid Unicode"),
    ],
)
def test_what_jsonb_cannot_store_is_refused(value: Any, reason: str) -> None:
    with pytest.raises(PayloadError, match=reason):
        to_json("value", value)


def test_a_value_that_contains_itself_is_refused() -> None:
    looped: list[Any] = []
    looped.append(looped)
    with pytest.raises(PayloadError, match="contains itself"):
        to_json("value", looped)

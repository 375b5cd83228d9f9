"""Input checks shared by every source: names, durations and JSON payloads.

Each check raises before anything reaches the database, so bad input never leaves a
half-written state behind.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NoReturn

from .errors import InvalidArgumentError, PayloadError

NAME_MAX_LENGTH = 48
"""Room for the library's prefixes and suffixes inside PostgreSQL's 63-byte identifiers."""

_NAME_RE = re.compile(r"[a-z0-9_]+")
_NUL_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False, ensure_ascii=False)
"""One encoder for every call (``json.dumps`` with options builds a new one each time)."""


def _not_json(value: object) -> NoReturn:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _c_encoder() -> Callable[[object, int], Iterable[str]] | None:
    """CPython's C encoder with ``_ENCODER``'s settings, made once rather than per call (no
    circular check: a cycle ends in RecursionError); None where there is none, or where it
    does not write what ``_ENCODER`` writes."""
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return None
    try:
        encode: Callable[[object, int], Iterable[str]] = make(
            None, _not_json, json.encoder.encode_basestring, None, ":", ",", False, False, False
        )
        probe = {"a": [1.5, None, True, "é\n", 10**20], "b": {}}
        if "".join(encode(probe, 0)) != _ENCODER.encode(probe):
            return None
    except Exception:
        return None
    return encode


_C_ENCODE = _c_encoder()


def check_name(kind: str, name: object) -> str:
    """Return ``name`` if it is a valid object name: 1-48 characters of ``[a-z0-9_]``."""
    if not isinstance(name, str):
        raise InvalidArgumentError(f"{kind} name must be a str, got {type(name).__name__}")
    if not name:
        raise InvalidArgumentError(f"{kind} name must not be empty")
    if len(name) > NAME_MAX_LENGTH:
        raise InvalidArgumentError(
            f"{kind} name {name!r} is {len(name)} characters; the limit is {NAME_MAX_LENGTH}"
        )
    if not _NAME_RE.fullmatch(name):
        raise InvalidArgumentError(
            f"{kind} name {name!r} may only contain lowercase letters, digits and '_'"
        )
    return name


def check_schema(schema: object) -> str:
    """Return ``schema`` if it is a usable schema name (same rules as object names)."""
    return check_name("schema", schema)


def check_seconds(what: str, value: object, *, allow_zero: bool = True) -> float:
    """Return ``value`` as float seconds; reject negatives, NaN, infinity and non-numbers."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgumentError(f"{what} must be a number of seconds, got {value!r}")
    seconds = float(value)
    if math.isnan(seconds) or math.isinf(seconds):
        raise InvalidArgumentError(f"{what} must be finite, got {value!r}")
    if seconds < 0 or (seconds == 0 and not allow_zero):
        bound = "not be negative" if allow_zero else "be positive"
        raise InvalidArgumentError(f"{what} must {bound}, got {value!r}")
    return seconds


def check_positive_int(what: str, value: object) -> int:
    """Return ``value`` if it is an int >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgumentError(f"{what} must be an integer >= 1, got {value!r}")
    return value


def to_json(what: str, value: object) -> str:
    """Serialise ``value`` to the JSON text PostgreSQL's jsonb accepts, or raise PayloadError."""
    try:
        if isinstance(value, str):
            text = json.encoder.encode_basestring(value)
        elif _C_ENCODE is None:
            text = _ENCODER.encode(value)
        else:
            text = "".join(_C_ENCODE(value, 0))
    except (TypeError, ValueError) as exc:
        raise PayloadError(f"{what} is not JSON-serialisable: {exc}") from exc
    except RecursionError:
        raise PayloadError(
            f"{what} is not JSON-serialisable: it contains itself, or is nested too deeply"
        ) from None
    # json.dumps writes a NUL as \u0000; an escaped backslash before "u0000" is plain text.
    if "\\u0000" in text and _NUL_ESCAPE.search(text):
        raise PayloadError(f"{what} contains a NUL character, which jsonb cannot store")
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError as exc:  # a lone surrogate, e.g. from os.fsdecode()
            raise PayloadError(f"{what} is not valid Unicode: {exc}") from exc
    return text


def headers_json(headers: Mapping[str, Any] | None) -> str:
    """Serialise message headers: a mapping with string keys, JSON values."""
    if headers is None:
        return "{}"
    if not isinstance(headers, Mapping) or not all(isinstance(k, str) for k in headers):
        raise PayloadError("headers must be a mapping with str keys")
    return to_json("headers", dict(headers))

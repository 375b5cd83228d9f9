"""What the sink sends for an item, and what the source makes of a message.

JSON by default, with the library's encoder (``to_json``: what jsonb would accept):

* a ``Change`` is sent as ``{"id", "op", "table", "new", "old", "at", "txid", "pk", "lsn",
  "unchanged"}`` (``at`` in ISO 8601), with headers ``Pgstreams-Table``, ``Pgstreams-Op``,
  ``Pgstreams-Id`` and, for WAL capture, ``Pgstreams-Lsn``;
* a queue ``Envelope`` as its value, with headers ``Pgstreams-Queue-Id`` (its message id)
  and each of the message's own headers as ``Pgstreams-Header-<name>`` (JSON text);
* anything else as its JSON.

The default ``Nats-Msg-Id`` is ``<table>:<change id>`` for a change (WAL capture's ids
carry the commit LSN); for an envelope, ``<queue>:<message id>`` (a PgQueue),
``pgmq.<queue>:<message id>`` (a PgmqQueue), ``nats.<stream>:<sequence>`` (the NATS
source); other items need a ``msg_id=`` function. A ``serializer=`` replaces the body's
encoding (headers stay).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from typing import Any

from .._core.envelope import Envelope
from .._core.errors import InvalidArgumentError, PayloadError
from .._core.validate import to_json
from .._sources.changes.change import Change, change_document

__all__ = ["Serializer", "change_document", "default_headers", "default_msg_id", "encode"]

Serializer = Callable[[Any], bytes]
HEADER_PREFIX = "Pgstreams-Header-"
HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
"""A header name (an HTTP token), as NATS takes it."""


def encode(item: Any) -> bytes:
    """The default serializer (see module docstring)."""
    if isinstance(item, Change):
        return to_json("change", change_document(item)).encode()
    if isinstance(item, Envelope):
        return to_json("message", item.value).encode()
    return to_json("item", item).encode()


def default_headers(item: Any) -> dict[str, str]:
    if isinstance(item, Change):
        headers = {
            "Pgstreams-Table": item.table,
            "Pgstreams-Op": item.op,
            "Pgstreams-Id": str(item.id),
        }
        if item.lsn is not None:
            headers["Pgstreams-Lsn"] = item.lsn
        return headers
    if isinstance(item, Envelope):
        headers = {"Pgstreams-Queue-Id": str(item.id)}
        for name, value in item.headers.items():
            if not HEADER_NAME.fullmatch(name):
                raise PayloadError(
                    f"message header {name!r} cannot be a NATS header name (letters, digits"
                    " and !#$%&'*+-.^_`|~ only)"
                )
            headers[HEADER_PREFIX + name] = to_json(f"header {name!r}", value)
        return headers
    return {}


def default_msg_id(item: Any) -> str:
    if isinstance(item, Change):
        return f"{item.table}:{item.id}"
    if isinstance(item, Envelope):
        source = getattr(item._queue, "msg_id_source", None)
        if isinstance(source, str) and source:
            return f"{source}:{item.id}"
        raise InvalidArgumentError(
            f"no default Nats-Msg-Id for an envelope of {type(item._queue).__name__}: pass"
            " msg_id= (a function of the envelope giving a string unique to the message)"
        )
    raise InvalidArgumentError(
        f"no default Nats-Msg-Id for a {type(item).__name__}: pass msg_id= (a function of"
        " the item giving a string unique to it and the same on a resend)"
    )


def serialized(serializer: Serializer | None, item: Any) -> bytes:
    """``item``'s body, or PayloadError saying why it has none."""
    if serializer is None:
        return encode(item)
    try:
        body = serializer(item)
    except PayloadError:
        raise
    except Exception as exc:
        raise PayloadError(f"the serializer refused {type(item).__name__} item: {exc}") from exc
    if not isinstance(body, bytes | bytearray | memoryview):
        raise PayloadError(f"the serializer must return bytes, got {type(body).__name__}")
    return bytes(body)


def decode(data: bytes) -> Any:
    """The default deserializer: JSON."""
    return json.loads(data)


def envelope_headers(headers: Mapping[str, str] | None) -> dict[str, Any]:
    """A message's headers as an envelope shows them: ``Pgstreams-Header-*`` decoded back
    to the original names and values, the rest as strings."""
    out: dict[str, Any] = {}
    for name, value in (headers or {}).items():
        if name.startswith(HEADER_PREFIX):
            try:
                out[name[len(HEADER_PREFIX) :]] = json.loads(value)
                continue
            except ValueError:
                pass
        out[name] = value
    return out

"""Parts of the NATS bridge that need no server: reading a delivery from its ack subject,
and the header block the sink writes."""

from __future__ import annotations

from typing import Any

import pytest
from nats.aio.msg import Msg
from nats.errors import NotJSMessageError

from pgstreams.nats import pubacks
from pgstreams.nats.source import _delivery

REPLIES = [
    "$JS.ACK.ORDERS.indexer.3.1042.77.1765000000123456789.12",  # no domain
    "$JS.ACK.hub.ACCHASH.ORDERS.indexer.1.9.9.1765000000000000001.0",  # domain, no token
    "$JS.ACK._.ACCHASH.ORDERS.indexer.5.18446744073709551615.2.1765000000999999999.4.tok",
]


@pytest.mark.parametrize("reply", REPLIES)
def test_a_delivery_is_read_as_nats_py_reads_its_metadata(reply: str) -> None:
    msg = Msg(_client=None, subject="orders.x", reply=reply)  # type: ignore[arg-type]
    meta = msg.metadata
    assert _delivery(msg) == (meta.sequence.stream, meta.num_delivered, meta.timestamp)


def test_an_unknown_ack_subject_is_left_to_nats_py() -> None:
    msg = Msg(_client=None, subject="x", reply="_INBOX.abc")  # type: ignore[arg-type]
    with pytest.raises(NotJSMessageError):
        _delivery(msg)


@pytest.mark.parametrize(
    ("headers", "block"),
    [
        ({}, b"NATS/1.0\r\n\r\n"),
        ({"A": "1", "B": " two "}, b"NATS/1.0\r\nA: 1\r\nB: two\r\n\r\n"),
        ({"A": "x\r\ny\nz"}, b"NATS/1.0\r\nA: x  y z\r\n\r\n"),
        ({"A": "ünï"}, "NATS/1.0\r\nA: ünï\r\n\r\n".encode()),
    ],
)
def test_the_header_block(headers: dict[str, Any], block: bytes) -> None:
    assert pubacks.header_block(headers) == block

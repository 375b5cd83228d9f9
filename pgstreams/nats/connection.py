"""Connecting to NATS and making sure a JetStream stream exists.

``connect(url)`` fails fast when the server cannot be reached at first (a clear error with
the URL), then reconnects for ever: an outage of a connected client is ridden out, with
what it publishes meanwhile buffered (see the sink for what happens to messages in flight).
The client's own error reports go to the ``pgstreams.nats`` logger.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import StreamConfig, StreamInfo
from nats.js.errors import NotFoundError

from .._core.errors import InvalidArgumentError
from .._core.validate import check_seconds
from .errors import NatsConnectError
from .subjects import check_filter, check_stream_name

__all__ = ["close", "connect", "ensure_stream"]

logger = logging.getLogger("pgstreams.nats")

DEFAULT_URL = "nats://127.0.0.1:4222"


async def connect(
    url: str | Sequence[str] = DEFAULT_URL, *, connect_timeout: float = 5.0, **options: Any
) -> JetStreamContext:
    """A JetStream context on a new client. ``options`` go to ``nats.connect`` (credentials,
    TLS, ...); close it with ``close(js)``."""
    servers = [url] if isinstance(url, str) else list(url)
    if not servers or not all(isinstance(s, str) and s for s in servers):
        raise InvalidArgumentError(f"url must be a NATS URL or a list of them, got {url!r}")
    check_seconds("connect_timeout", connect_timeout, allow_zero=False)
    forever = "max_reconnect_attempts" not in options
    client = Client()

    async def disconnected() -> None:
        if not client.is_closed:
            logger.warning("NATS: disconnected from %s; reconnecting", client.connected_url)

    options.setdefault("max_reconnect_attempts", 1)  # at first: fail fast
    options.setdefault("reconnect_time_wait", 0.5)
    options.setdefault("error_cb", _error)
    options.setdefault("disconnected_cb", disconnected)
    options.setdefault("reconnected_cb", _reconnected)
    try:
        await client.connect(servers, connect_timeout=connect_timeout, **options)  # type: ignore[arg-type]
    except Exception as exc:  # nats-py raises several kinds (NoServersError, OSError, ...)
        shown = ", ".join(servers)
        raise NatsConnectError(
            f"cannot connect to NATS at {shown}: {exc or type(exc).__name__}; is nats-server"
            " running there (with -js for JetStream)?"
        ) from exc
    if forever:
        client.options["max_reconnect_attempts"] = -1  # once connected: ride out outages
    return client.jetstream()


async def close(js: JetStreamContext) -> None:
    """Close the client ``connect()`` made, flushing what it buffered -- unless the server
    is away: then that is dropped (nothing was acked upstream for it), where nats-py would
    fail trying to write it and leave its tasks running."""
    client = js._nc
    if not client.is_connected and isinstance(getattr(client, "_pending", None), list):
        client._pending = []
        client._pending_data_size = 0
    await client.close()


async def ensure_stream(
    js: JetStreamContext,
    name: str,
    *,
    subjects: Sequence[str],
    duplicate_window: float = 120.0,
    **config: Any,
) -> StreamInfo:
    """Create the stream, or update its subjects, duplicate window and ``config`` (any
    ``StreamConfig`` field) where they differ. ``duplicate_window`` (seconds) is how long
    JetStream remembers a ``Nats-Msg-Id``: a resend within it is dropped."""
    check_stream_name(name)
    if isinstance(subjects, str) or not subjects:
        raise InvalidArgumentError(f"subjects must be a non-empty list of subjects: {subjects!r}")
    wanted = [check_filter(s) for s in subjects]
    window = check_seconds("duplicate_window", duplicate_window, allow_zero=False)
    try:
        info = await js.stream_info(name)
    except NotFoundError:
        created = await js.add_stream(
            StreamConfig(name=name, subjects=wanted, duplicate_window=window, **config)
        )
        logger.info("created JetStream stream %s on %s", name, ", ".join(wanted))
        return created
    current = info.config
    changes: dict[str, Any] = {}
    if sorted(current.subjects or []) != sorted(wanted):
        changes["subjects"] = wanted
    if current.duplicate_window != window:
        changes["duplicate_window"] = window
    changes.update({k: v for k, v in config.items() if getattr(current, k, None) != v})
    if not changes:
        return info
    updated = await js.update_stream(current.evolve(**changes))
    logger.info("updated JetStream stream %s: %s", name, ", ".join(sorted(changes)))
    return updated


async def _error(exc: Exception) -> None:
    logger.warning("NATS: %s", exc or type(exc).__name__)


async def _reconnected() -> None:
    logger.info("NATS: reconnected")

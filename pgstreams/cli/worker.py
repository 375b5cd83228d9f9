"""``pgstreams worker MODULE:OBJECT``: a workflow worker as a long-lived process.

OBJECT is a ``WorkflowEngine``, or a callable returning one (given the ``Database`` if it
takes an argument; it may be async). On SIGTERM or SIGINT the worker stops claiming runs
and gives the ones in flight ``--grace`` seconds to finish; it hands back those still
running then -- or at once, on a second signal -- and exits 0. Another worker resumes a
handed-back run from its last finished step (no run is lost, none completes twice).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import logging
import os
import signal
import sys
from typing import Any

import anyio

from .._pg.database import Database
from .._workflows.engine import WorkflowEngine
from .output import UsageError

__all__ = ["load_engine", "worker"]

logger = logging.getLogger("pgstreams.worker")


async def load_engine(target: str, db: Database) -> WorkflowEngine:
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise UsageError(f"worker takes MODULE:OBJECT (like app.jobs:engine), got {target!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        found: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"cannot import {module_name!r}: {exc}") from exc
    for part in attribute.split("."):
        if not hasattr(found, part):
            raise UsageError(f"{module_name!r} has no {attribute!r}")
        found = getattr(found, part)
    if not isinstance(found, WorkflowEngine) and callable(found):
        takes_db = len(inspect.signature(found).parameters) >= 1
        found = found(db) if takes_db else found()
        if inspect.isawaitable(found):
            found = await found
    if not isinstance(found, WorkflowEngine):
        raise UsageError(f"{target} is not a WorkflowEngine nor returns one")
    return found


async def worker(db: Database, args: argparse.Namespace) -> int:
    """Runs until a signal; its own signal handling, not the CLI's (the first signal
    ends the worker block normally, so runs in flight get their grace period)."""
    if args.concurrency < 1:
        raise UsageError(f"--concurrency must be at least 1, got {args.concurrency}")
    if args.grace < 0:
        raise UsageError(f"--grace must be 0 or more seconds, got {args.grace}")
    engine = await load_engine(args.target, db)
    stop = anyio.Event()
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with anyio.create_task_group() as tg:

            async def on_signals() -> None:
                async for signum in signals:
                    if stop.is_set():
                        logger.info("second signal: handing back the runs in flight now")
                        tg.cancel_scope.cancel()
                        return
                    logger.info(
                        "%s: finishing the runs in flight (up to %g s; again to stop now)",
                        signal.Signals(signum).name,
                        args.grace,
                    )
                    stop.set()

            tg.start_soon(on_signals)
            logger.info("worker for %s started, %d at a time", args.target, args.concurrency)
            try:
                async with engine.worker(concurrency=args.concurrency, grace=args.grace):
                    await stop.wait()
            finally:
                logger.info("worker for %s stopped", args.target)
            tg.cancel_scope.cancel()
    return 0

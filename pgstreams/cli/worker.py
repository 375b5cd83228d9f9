"""``pgstreams worker MODULE:OBJECT``: a workflow worker as a long-lived process.

OBJECT is a ``WorkflowEngine``, or a callable returning one (given the ``Database`` if it
takes an argument; it may be async). On SIGTERM or SIGINT the worker stops claiming runs
and hands back the ones in flight at once: another worker resumes each from its last
finished step (no run is lost, none completes twice).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import logging
import os
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
    if args.concurrency < 1:
        raise UsageError(f"--concurrency must be at least 1, got {args.concurrency}")
    engine = await load_engine(args.target, db)
    logger.info("worker for %s started, %d at a time", args.target, args.concurrency)
    try:
        async with engine.worker(concurrency=args.concurrency):
            await anyio.sleep_forever()
    finally:
        logger.info("worker for %s stopped; runs in flight were handed back", args.target)
    return 0  # pragma: no cover - the loop ends by cancellation

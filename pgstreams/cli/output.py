"""What the commands print: aligned tables, or JSON with ``--json``; and the one error a
command raises for bad arguments it finds itself."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

__all__ = ["UsageError", "age", "emit", "table"]


class UsageError(Exception):
    """A bad argument found after parsing (exit code 2)."""


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Columns padded to their widest cell; None shows as "-"."""
    cells = [[("-" if v is None else str(v)) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


def age(since: datetime | None, now: datetime) -> str | None:
    if since is None:
        return None
    seconds = max((now - since) / timedelta(seconds=1), 0.0)
    return f"{seconds:.0f}s" if seconds < 120 else f"{seconds / 60:.0f}m"


def emit(args: argparse.Namespace, data: Any, text: str) -> None:
    """Print ``data`` as JSON with ``--json``, else ``text``."""
    print(json.dumps(data, default=str, indent=2) if args.json else text)

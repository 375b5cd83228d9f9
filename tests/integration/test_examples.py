"""The runnable examples run to completion (each starts its own embedded server)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import anyio
import pytest

EXAMPLES = sorted((Path(__file__).parents[2] / "examples").glob("*.py"))

STORIES = {
    # subscribing to table changes: live, then a durable consumer resuming
    "table_changes": ["#4 delete", "indexer, run 2:"],
    # a stream pipeline into a durable workflow, a failed step retried
    "signup_workflow": ["('welcome', 2, 'succeeded')"],
    # manual ack/nack: a retry after a nack, a message dead after max_attempts
    "ack_nack_consumer": ["p2: attempt 2 charged, ack", "after 3 attempts: card expired"],
}
"""The user stories' examples, and lines each must print."""


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.stem for p in EXAMPLES])
async def test_example_runs(script: Path) -> None:
    result = await anyio.run_process(
        [sys.executable, str(script)], check=False, stderr=subprocess.STDOUT
    )
    out = result.stdout.decode()
    assert result.returncode == 0, out
    assert out.strip()
    for line in STORIES.get(script.stem, []):
        assert line in out, out


def test_every_example_is_found() -> None:
    assert {p.stem for p in EXAMPLES} >= {"quickstart", "pgmq_orders", *STORIES}

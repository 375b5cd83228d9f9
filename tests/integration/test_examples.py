"""The runnable examples run to completion (each starts its own embedded server)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import anyio
import pytest

EXAMPLES = sorted((Path(__file__).parents[2] / "examples").glob("*.py"))


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.stem for p in EXAMPLES])
async def test_example_runs(script: Path) -> None:
    result = await anyio.run_process(
        [sys.executable, str(script)], check=False, stderr=subprocess.STDOUT
    )
    assert result.returncode == 0, result.stdout.decode()
    assert result.stdout.strip()


def test_every_example_is_found() -> None:
    assert {p.stem for p in EXAMPLES} >= {"quickstart", "pgmq_orders"}

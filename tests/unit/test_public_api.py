"""The facade: every name in __all__ imports, nothing private leaks."""

from __future__ import annotations

import pgstreams as ps


def test_all_names_import() -> None:
    for name in ps.__all__:
        assert getattr(ps, name) is not None


PUBLIC_SUBPACKAGES = {"testing", "cli", "nats"}
"""Documented subpackages; they appear as attributes once imported (conftest imports testing,
the command line's unit tests import cli, the NATS tests import nats)."""


def test_nothing_else_is_public() -> None:
    public = {n for n in vars(ps) if not n.startswith("_")} - PUBLIC_SUBPACKAGES
    assert public == set(ps.__all__) - {"__version__"}


def test_the_testing_helpers_import() -> None:
    import pgstreams.testing as pst

    assert {"embedded", "server", "fresh_database", "terminate_backends"} <= set(pst.__all__)


def test_import_pgstreams_imports_no_optional_client() -> None:
    """The NATS and Redis clients are imported only by the modules that need them
    (OpenTelemetry, when installed, is used from the start: see test_telemetry)."""
    import subprocess
    import sys

    code = "import sys, pgstreams; print(sorted(m for m in ('nats', 'redis') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

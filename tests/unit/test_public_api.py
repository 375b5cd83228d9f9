"""The facade: every name in __all__ imports, nothing private leaks."""

from __future__ import annotations

import pgstreams as ps


def test_all_names_import() -> None:
    for name in ps.__all__:
        assert getattr(ps, name) is not None


PUBLIC_SUBPACKAGES = {"testing"}
"""Documented subpackages; they appear as attributes once imported (conftest imports testing)."""


def test_nothing_else_is_public() -> None:
    public = {n for n in vars(ps) if not n.startswith("_")} - PUBLIC_SUBPACKAGES
    assert public == set(ps.__all__) - {"__version__"}


def test_the_testing_helpers_import() -> None:
    import pgstreams.testing as pst

    assert {"embedded", "server", "fresh_database", "terminate_backends"} <= set(pst.__all__)

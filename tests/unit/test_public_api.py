"""The facade: every name in __all__ imports, nothing private leaks."""

from __future__ import annotations

import pgstreams as ps


def test_all_names_import() -> None:
    for name in ps.__all__:
        assert getattr(ps, name) is not None


def test_nothing_else_is_public() -> None:
    public = {n for n in vars(ps) if not n.startswith("_")}
    assert public == set(ps.__all__) - {"__version__"}

"""The workflow engine depends on the storage protocol, not on a storage backend."""

from __future__ import annotations

import ast
from pathlib import Path

import pgstreams._workflows.engine as engine_module
import pgstreams._workflows.trigger as trigger_module
import pgstreams._workflows.workflow as workflow_module

BACKENDS = ("pgstreams._workflows.pg", "pgstreams._workflows.redis", "pgstreams._pg")


def runtime_imports(path: Path) -> set[str]:
    """The modules a file imports when it is loaded: module-level imports, less those
    under ``if TYPE_CHECKING:`` (function bodies import only when called)."""
    found: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            package = {0: "", 1: "pgstreams._workflows.", 2: "pgstreams."}[node.level]
            found.add(package + (node.module or ""))
    return found


def test_the_engine_imports_no_storage_backend() -> None:
    for module in (engine_module, trigger_module, workflow_module):
        assert module.__file__ is not None
        imported = runtime_imports(Path(module.__file__))
        assert imported, module.__name__
        backends = {m for m in imported if m.startswith(BACKENDS)}
        assert not backends, f"{module.__name__} imports {sorted(backends)}"

"""The layers of the code, as docs/architecture.md states them: each imports only the ones before it."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ACTORS = ["engine", "observe", "store", "hosting", "apps"]
SDK_DEFINITIONS = {"errors", "models", "conditions", "context", "_cel", "_codec", "durations", "limits", "config",
                   "gates"}
"""What users import that the engine also builds on: no I/O, and nothing of actors."""


def runtime_imports(path: Path) -> list[str]:
    """Modules imported at run time (``if TYPE_CHECKING:`` blocks are for type checkers only)."""
    found: list[str] = []

    class Visitor(ast.NodeVisitor):
        def visit_If(self, node: ast.If) -> None:
            if "TYPE_CHECKING" not in ast.unparse(node.test):
                self.generic_visit(node)

        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            if node.module:
                found.extend(f"{node.module}.{a.name}" if node.module == "sdk" else node.module for a in node.names)

        def visit_Import(self, node: ast.Import) -> None:
            found.extend(a.name for a in node.names)

    Visitor().visit(ast.parse(path.read_text()))
    return found


def test_each_runtime_layer_imports_only_the_layers_before_it() -> None:
    wrong = []
    for layer in ACTORS:
        for path in (REPO / "actors" / layer).glob("*.py"):
            for mod in runtime_imports(path):
                parts = mod.split(".")
                if parts[0] == "actors" and len(parts) > 1 and parts[1] in ACTORS:
                    if ACTORS.index(parts[1]) > ACTORS.index(layer):
                        wrong.append(f"actors/{layer}/{path.name} imports {mod}")
                if parts[0] == "sdk" and layer == "engine" and (len(parts) < 2 or parts[1] not in SDK_DEFINITIONS):
                    wrong.append(f"actors/engine/{path.name} imports {mod}: only sdk definitions are allowed")
    assert wrong == []


def test_sdk_definitions_import_nothing_of_the_runtime() -> None:
    wrong = [f"sdk/{name}.py imports {mod}" for name in SDK_DEFINITIONS
             for mod in runtime_imports(REPO / "sdk" / f"{name}.py")
             if mod.startswith("actors") or (mod.startswith("sdk.") and mod.split(".")[1] not in SDK_DEFINITIONS)]
    assert wrong == []

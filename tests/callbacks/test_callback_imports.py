"""The rule the callbacks' docstrings state: each module imports only the standard library, torch,
lightning, typing_extensions, the Trainer-free engines (lit_accel.core) and the callbacks' shared
protocols, so a callback works with any LightningModule and DataModule."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

CALLBACKS = Path(__file__).resolve().parents[2] / "lit_accel" / "callbacks"
# typing_extensions: @override on every hook (mypy catches a misspelled one); torch and lightning
# already require it, so a copied callback brings no new dependency.
ALLOWED_ROOTS = {"torch", "lightning", "lightning_utilities", "typing_extensions"}
ALLOWED_LIT_ACCEL = ("lit_accel.core", "lit_accel.callbacks.shared", "lit_accel.callbacks.drawing")


def _imported(path: Path) -> set[str]:
    """Module-level imports (also under a top-level ``if``/``try``). Imports inside a function are
    optional extras loaded when used (numpy's RNG state, matplotlib for figures), not requirements."""
    names: set[str] = set()
    top = [n for n in ast.parse(path.read_text()).body if not isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    for node in (inner for stmt in top for inner in ast.walk(stmt)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize(
    "path", sorted(p for p in CALLBACKS.glob("*.py") if p.name != "__init__.py"), ids=lambda p: p.name
)
def test_callback_module_imports_only_what_it_can_carry_along(path):
    foreign = {
        name
        for name in _imported(path)
        if name.split(".")[0] not in ALLOWED_ROOTS | set(sys.stdlib_module_names) | {"__future__"}
        and not any(name == allowed or name.startswith(allowed + ".") for allowed in ALLOWED_LIT_ACCEL)
    }
    assert not foreign, (
        f"{path.name} imports {sorted(foreign)}: "
        f"callbacks may import only torch, lightning, typing_extensions, {', '.join(ALLOWED_LIT_ACCEL)} "
        "and the standard library at module level"
    )

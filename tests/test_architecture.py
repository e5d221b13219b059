"""The package's shape, read from its imports (no code runs): what ``lint-imports`` cannot say.

import-linter's contracts (pyproject.toml, run by .ci/run) hold the boundaries between parts; here:
no import cycle between any two modules, the engines' third-party imports, and no private name
imported across modules.
"""

from __future__ import annotations

import ast
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import grimp

from helpers import REPO_ROOT

# Every folder of first-party Python: the package, the tests, the tools and the examples.
SOURCE_DIRS = [REPO_ROOT / name for name in ("lit_accel", "tests", "tools", "examples")]


def _graph(external: bool = False) -> grimp.ImportGraph:
    """lit_accel's import graph, imports inside functions and under ``if TYPE_CHECKING`` included."""
    return grimp.build_graph("lit_accel", include_external_packages=external, cache_dir=None)


def find_cycles(imports: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of a graph ``{module: modules it imports}``: one per strongly connected
    group of modules, as the shortest path from the group's first module (by name) back to itself."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def visit(module: str) -> None:  # Tarjan's algorithm; the graph has tens of modules
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in sorted(imports.get(module, ())):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == module:
                    break
            if len(group) > 1 or module in imports.get(module, ()):
                groups.append(group)

    for module in sorted(imports):
        if module not in index:
            visit(module)
    return [_shortest_cycle(min(group), group, imports) for group in sorted(groups, key=min)]


def _shortest_cycle(start: str, group: set[str], imports: dict[str, set[str]]) -> list[str]:
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for module in frontier:
            for imported in sorted(imports.get(module, set()) & group):
                if imported == start:
                    return [*paths[module], start]
                if imported not in paths:
                    paths[imported] = [*paths[module], imported]
                    following.append(imported)
        frontier = following
    raise AssertionError(f"{start} is in no cycle of {sorted(group)}")


def test_find_cycles_names_each_cycle_once():
    imports = {"a": {"b"}, "b": {"c", "d"}, "c": {"a"}, "d": set(), "e": {"e"}, "f": {"d"}}
    assert find_cycles(imports) == [["a", "b", "c", "a"], ["e", "e"]]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_no_import_cycle_between_any_two_modules():
    """Stricter than the acyclic_siblings contract: a package's __init__ and its own modules, or two
    modules of one package, may not import each other either."""
    graph = _graph()
    imports = {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    cycles = find_cycles(imports)
    assert not cycles, "import cycles (imports inside functions count): " + "; ".join(
        " -> ".join(cycle) for cycle in cycles
    )


def test_the_engines_import_torch_and_the_standard_library_only():
    graph = _graph(external=True)
    allowed = {"torch", "__future__", *sys.stdlib_module_names}
    foreign = {
        (module, imported)
        for module in graph.find_descendants("lit_accel.core") | {"lit_accel.core"}
        for imported in graph.find_modules_directly_imported_by(module)
        if not imported.startswith("lit_accel.core") and imported.split(".")[0] not in allowed
    }
    assert not foreign, f"lit_accel.core imports what a plain PyTorch loop may not have: {sorted(foreign)}"


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _first_party_roots() -> set[str]:
    """Top-level names that import our own code: the folders, and the modules in tests/, tools/
    and examples/ that a script imports by its bare name (``from helpers import …``)."""
    roots = {folder.name for folder in SOURCE_DIRS}
    for folder in SOURCE_DIRS[1:]:
        roots |= {path.stem for path in folder.rglob("*.py")}
    return roots


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _may_import_a_private_name(text: str) -> bool:
    """Whether a line that starts an import (its continuation lines included) names a private
    identifier: a cheap filter, so that only those files are parsed (parsing all takes seconds)."""
    lines = text.splitlines()
    for number, line in enumerate(lines):
        if line.lstrip().startswith(("import ", "from ")):
            statement = line
            while number + 1 < len(lines) and (statement.count("(") > statement.count(")") or statement.endswith("\\")):
                number += 1
                statement += lines[number]
            if any(_is_private(name) for name in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", statement)):
                return True
    return False


def private_imports(path: Path, first_party: set[str], root: Path = REPO_ROOT) -> Iterator[str]:
    """Each import in ``path`` of a private name (``_x``) or from a private module (``_mod``) of our
    own code, as ``"file:line imports …"``; a module may use its own private names."""
    text = path.read_text()
    if not _may_import_a_private_name(text):
        return
    tree = ast.parse(text, filename=str(path))
    here = _module_name(path, root).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    where = path.relative_to(root)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] in first_party and any(_is_private(p) for p in parts):
                    yield f"{where}:{node.lineno} imports {alias.name}"
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from its own package upwards
                base = package[: len(package) - node.level + 1] if node.level > 1 else package
                parts = [*base, *(node.module.split(".") if node.module else [])]
            else:
                parts = (node.module or "").split(".")
            if parts[0] not in first_party or parts == here:
                continue
            for alias in node.names:
                if any(_is_private(p) for p in parts) or _is_private(alias.name):
                    yield f"{where}:{node.lineno} imports {alias.name} from {'.'.join(parts)}"


def test_private_imports_finds_private_names_and_private_modules(tmp_path):
    (tmp_path / "pkg").mkdir()
    source = tmp_path / "pkg" / "user.py"
    source.write_text(
        "import os._x\n"  # not ours
        "from pkg.engine import public, _private\n"
        "from pkg._hidden import anything\n"
        "import pkg._hidden.deeper as deeper\n"
        "from . import _sibling, __version__\n"
        "from .user import _mine\n"  # its own name
        "from pkg.engine import __all__\n"
        "def later():\n"
        "    from pkg.engine import _deferred\n"
    )
    assert sorted(private_imports(source, {"pkg"}, root=tmp_path)) == [
        "pkg/user.py:2 imports _private from pkg.engine",
        "pkg/user.py:3 imports anything from pkg._hidden",
        "pkg/user.py:4 imports pkg._hidden.deeper",
        "pkg/user.py:5 imports _sibling from pkg",
        "pkg/user.py:9 imports _deferred from pkg.engine",
    ]


def test_no_private_name_is_imported_from_another_module():
    """What is shared gets a public name where it lives: tests and tools use what a user can."""
    first_party = _first_party_roots()
    offences = sorted(
        offence
        for folder in SOURCE_DIRS
        if folder.is_dir()
        for path in sorted(folder.rglob("*.py"))
        for offence in private_imports(path, first_party)
    )
    assert not offences, f"{len(offences)} imports of private names:\n" + "\n".join(offences)

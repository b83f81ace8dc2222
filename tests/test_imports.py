"""The package's import graph, read from the source with `ast` (nothing is imported):

- no import cycles between modules of `jaxedit/`, counting imports at module level, inside
  functions and classes alike (a function-level import is still a dependency; it only hides
  the cycle until the function runs). Imports under `if TYPE_CHECKING:` are left out: they are
  never executed, and are the standard way to name a type without depending on its module.
- no private names (`_name`) taken from another module: neither `from jaxedit.x import _name`
  nor `x._name` on a module bound by an import.

`from pkg import name` depends on the submodule `pkg.name` when there is one, else on `pkg`
(its `__init__`); relative imports are resolved against the importing module's package. The
implicit import of parent packages (`import a.b.c` runs `a/__init__` first) is not an edge:
counting it would put every module in a cycle with a package `__init__` that re-exports it.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "jaxedit"


@dataclass
class ModuleInfo:
    name: str
    path: Path
    is_package: bool
    imports: dict[str, int] = field(default_factory=dict)  # module -> first line importing it
    private: list[str] = field(default_factory=list)  # "line: what" of private names used


def discover(root: Path) -> dict[str, ModuleInfo]:
    """Every module under the package directory `root`, by dotted name."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_package else parts)
        out[name] = ModuleInfo(name, path, is_package)
    return out


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the nodes inside `if TYPE_CHECKING:` blocks (not executed at runtime)."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else getattr(test, "attr", None)
            if name == "TYPE_CHECKING":
                for child in node.body:
                    skipped.update(id(n) for n in ast.walk(child))
    return skipped


def _resolve_from(mod: ModuleInfo, node: ast.ImportFrom) -> str:
    """The absolute module name of `from <...> import` (relative levels resolved)."""
    if node.level == 0:
        return node.module or ""
    package = mod.name.split(".") if mod.is_package else mod.name.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def analyse(modules: dict[str, ModuleInfo]) -> dict[str, ModuleInfo]:
    """Fill in each module's imports (edges to other modules of the set) and private uses."""
    for mod in modules.values():
        tree = ast.parse(mod.path.read_text(), str(mod.path))
        skipped = _type_checking_nodes(tree)
        bound: dict[str, str] = {}  # local name -> module it is bound to (for x._name)

        def depend(target: str, line: int, mod: ModuleInfo = mod) -> None:
            if target in modules and target != mod.name:
                mod.imports.setdefault(target, line)

        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.Import):
                for alias in node.names:
                    depend(alias.name, node.lineno)
                    if alias.asname and alias.name in modules:
                        bound[alias.asname] = alias.name
            elif isinstance(node, ast.ImportFrom):
                base = _resolve_from(mod, node)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    if sub in modules:
                        depend(sub, node.lineno)
                        bound[alias.asname or alias.name] = sub
                        continue
                    depend(base, node.lineno)
                    if base in modules and base != mod.name and _is_private(alias.name):
                        mod.private.append(f"{node.lineno}: from {base} import {alias.name}")
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in bound
                and bound[node.value.id] != mod.name
                and _is_private(node.attr)
            ):
                mod.private.append(f"{node.lineno}: {bound[node.value.id]}.{node.attr}")
    return modules


def import_graph(root: Path) -> dict[str, ModuleInfo]:
    return analyse(discover(root))


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (or a self-loop), each as
    one cycle through all of its modules' first member: Tarjan's algorithm, iteratively."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in graph.get(node, ()):
                    components.append(_cycle_in(sorted(component), graph))
    return components


def _cycle_in(component: list[str], graph: dict[str, set[str]]) -> list[str]:
    """One concrete cycle from the component's first module back to it (breadth-first)."""
    members, first = set(component), component[0]
    paths = {first: [first]}
    frontier = [first]
    while frontier:
        nxt = []
        for node in frontier:
            for child in sorted(graph.get(node, ())):
                if child == first:
                    return paths[node] + [first]
                if child in members and child not in paths:
                    paths[child] = paths[node] + [child]
                    nxt.append(child)
        frontier = nxt
    return component


def edges(modules: dict[str, ModuleInfo]) -> dict[str, set[str]]:
    return {name: set(m.imports) for name, m in modules.items()}


def describe(cycle: list[str], modules: dict[str, ModuleInfo]) -> str:
    steps = []
    for a, b in zip(cycle, cycle[1:], strict=False):
        steps.append(f"{a} (line {modules[a].imports[b]}) -> {b}")
    return " ; ".join(steps)


# ----------------------------------------------------------------------------- the package


@pytest.fixture(scope="module")
def package():
    return import_graph(PACKAGE)


def test_no_import_cycles(package):
    cycles = find_cycles(edges(package))
    assert not cycles, "import cycles:\n" + "\n".join(describe(c, package) for c in cycles)


def test_no_private_names_across_modules(package):
    found = [
        f"{m.path.relative_to(PACKAGE.parent)}:{p}" for m in package.values() for p in m.private
    ]
    assert not found, "private names used across modules:\n" + "\n".join(found)


def test_the_graph_sees_the_package(package):
    """A sanity floor: the parser finds the modules and the imports we know are there."""
    assert "jaxedit.models.transformer" in package["jaxedit.io.checkpoint"].imports
    assert "jaxedit.models.config" in package["jaxedit.models.transformer"].imports
    assert len(package) > 30


# ----------------------------------------------------------------------------- the checker


def test_find_cycles_on_synthetic_graphs():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"a"}}) == []
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"a"}}) == [["a", "a"]]
    two = find_cycles({"a": {"b"}, "b": {"a", "c"}, "c": {"d"}, "d": {"c"}})
    assert sorted(two) == [["a", "b", "a"], ["c", "d", "c"]]


def write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


def test_parser_finds_function_level_relative_and_submodule_imports(tmp_path):
    """A cycle closed only by a function-level import, a `from pkg import submodule`, a
    relative import; a TYPE_CHECKING import that must not count; private names both ways."""
    pkg = write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "from pkg import b\n",
            "pkg/b.py": "def f():\n    from .sub import c\n    return c._hidden\n",
            "pkg/sub/__init__.py": "",
            "pkg/sub/c.py": "from ..a import _secret\n",
            "pkg/d.py": (
                "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n"
            ),
        },
    )
    modules = import_graph(pkg)
    assert modules["pkg.a"].imports == {"pkg.b": 1}
    assert modules["pkg.b"].imports == {"pkg.sub.c": 2}
    assert modules["pkg.sub.c"].imports == {"pkg.a": 1}
    assert modules["pkg.d"].imports == {}
    assert find_cycles(edges(modules)) == [["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]]
    assert modules["pkg.sub.c"].private == ["1: from pkg.a import _secret"]
    assert modules["pkg.b"].private == ["3: pkg.sub.c._hidden"]

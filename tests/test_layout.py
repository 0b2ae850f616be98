"""The layout of ``flexgen/`` as CONTRIBUTING.md draws it: no import circles, every module says
what it is for, and each folder imports only what its place on the map allows.

Imports are read from the source (``ast``), so a lazy import inside a function counts as much
as one at the top: a circle through a lazy import still ties two modules together.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "flexgen"


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The flexgen modules ``name`` imports (a package's own parents excluded: importing
    ``flexgen.a.b`` runs ``flexgen/__init__`` whoever asks, which is not a dependency)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    deps = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            # "from a import b": b is a module of a, or a name defined in a
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):
                deps.add(target)
    return deps


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for dep in GRAPH[node]:
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in on_stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in GRAPH:
        if node not in index:
            visit(node)
    return found


def test_no_module_of_flexgen_imports_one_that_imports_it_back():
    assert _cycles() == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_opens_with_a_docstring_that_says_what_it_is_for(name):
    docstring = ast.get_docstring(ast.parse(MODULES[name].read_text(encoding="utf-8")))
    assert docstring and len(docstring.split()) >= 5, f"{name} has no opening docstring"


#: Modules every part may import: small, and importing nothing above them.
LEAVES = {"errors", "paths", "policy", "workspace", "atomic", "scratch", "registry", "threads", "dtypes", "linear",
          "kernels"}
PLUGIN_KINDS = {"storage", "attention", "compression", "scheduling"}

#: What each part of flexgen/ may import besides itself and the leaves: the map drawn in
#: CONTRIBUTING.md's layout, from the bottom (the plugin kinds, the model math) to the top
#: (the command line). A part not named here is a leaf.
MAY_IMPORT = {
    "storage": set(),
    "compression": set(),
    "scheduling": set(),
    "attention": {"compression"},  # a packed cache carries its compressor
    "models": {"storage"},  # converted weights are read through the storage's file format
    "engine": PLUGIN_KINDS | {"models"},
    "planner": PLUGIN_KINDS | {"models"},
    "config": {"models", "planner"},  # validates model sizes and hardware presets by name
    "predict": {"config", "engine", "models", "planner"},
    "bench": {"config", "engine", "models", "planner", "predict"},
    "batch": {"config", "predict"},
    "testing": PLUGIN_KINDS | {"models", "engine"},
    "cli": PLUGIN_KINDS | {"config", "engine", "models", "planner", "predict", "bench"},
    "__main__": {"cli"},
    "flexgen": {"engine", "batch"},  # the package's public names
}


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "flexgen"


def test_each_part_imports_only_what_the_map_allows():
    unexpected = []
    for module, deps in sorted(GRAPH.items()):
        part = _part(module)
        allowed = LEAVES | MAY_IMPORT.get(part, set()) | {part}
        unexpected += [f"{module} imports {dep}" for dep in sorted(deps) if _part(dep) not in allowed]
    assert unexpected == []


def test_the_map_names_every_part():
    assert {_part(name) for name in MODULES} <= LEAVES | set(MAY_IMPORT)

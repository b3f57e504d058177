"""The package's import graph: no cycles, and no private (``_``-prefixed) name used outside its module.

Every import statement counts, also those inside functions and under ``TYPE_CHECKING``: a cycle hidden in a lazy
import is still two modules that cannot be understood (or moved) one without the other.
"""
import ast
from pathlib import Path
from typing import Dict, List, Set, Tuple

import slimtorch

ROOT = Path(slimtorch.__file__).resolve().parent


def _modules() -> Dict[str, Tuple[Path, bool]]:
    """``{dotted name: (file, is_package)}`` for every module of slimtorch."""
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return out


MODULES = _modules()


def _imports(name: str) -> Tuple[Set[str], List[str], Set[str]]:
    """(slimtorch modules ``name`` imports, private names it imports from them, names bound to a module)."""
    path, is_package = MODULES[name]
    package = name if is_package else name.rpartition(".")[0]
    edges: Set[str] = set()
    private: List[str] = []
    module_aliases: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "slimtorch":
                continue
            for alias in node.names:
                full = f"{target}.{alias.name}"
                if full in MODULES:  # `from . import masks`: the submodule itself
                    edges.add(full)
                    module_aliases.add(alias.asname or alias.name)
                    continue
                edges.add(target)
                if alias.name.startswith("_"):
                    private.append(f"{name} imports {alias.name} from {target}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in MODULES:
                    edges.add(alias.name)
                    if alias.asname:
                        module_aliases.add(alias.asname)
    edges.discard(name)
    return edges, private, module_aliases


def _graph() -> Dict[str, Set[str]]:
    return {name: _imports(name)[0] for name in MODULES}


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_checker_sees_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_among_slimtorch_modules():
    graph = _graph()
    assert len(graph) > 40 and graph["slimtorch.quantization.api"]  # the walk found the package and its imports
    assert _cycles(graph) == []


def test_no_private_name_crosses_a_module_boundary():
    crossing = []
    for name in MODULES:
        _, private, aliases = _imports(name)
        crossing += private
        tree = ast.parse(MODULES[name][0].read_text())
        crossing += [f"{name} uses {node.value.id}.{node.attr}" for node in ast.walk(tree)
                     if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                     and node.value.id in aliases and node.attr.startswith("_")]
    assert crossing == []

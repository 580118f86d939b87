"""The shape of the code: imports flow one way (no cycle between zoo's modules, function-level imports
counted), no module imports another's private names, and the command line starts without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ZOO = Path(__file__).resolve().parents[1] / "zoo"


def zoo_modules() -> dict[str, Path]:
    modules = {}
    for path in ZOO.rglob("*.py"):
        parts = path.relative_to(ZOO.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return modules


def _target(name: str, modules: dict[str, Path]) -> str | None:
    """The zoo module an imported dotted name lives in (the longest prefix that is a module)."""
    parts = name.split(".")
    while parts:
        if ".".join(parts) in modules:
            return ".".join(parts)
        parts.pop()
    return None


def imports(modules: dict[str, Path]) -> tuple[dict[str, set[str]], list[tuple[str, str]]]:
    """Every zoo module each module imports, at any depth in the file; and the (module, private name)
    pairs imported from another module."""
    edges: dict[str, set[str]] = defaultdict(set)
    private = []
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [(alias.name, None) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{anchor}.{base}" if base else anchor
                targets = [(f"{base}.{alias.name}", alias.name) for alias in node.names]
            else:
                continue
            for dotted, imported in targets:
                if not dotted.startswith("zoo"):
                    continue
                target = _target(dotted, modules)
                if target and target != name:
                    edges[name].add(target)
                    is_module = dotted in modules
                    if (
                        imported
                        and imported.startswith("_")
                        and not imported.startswith("__")
                        and not is_module
                    ):
                        private.append((name, dotted))
    return edges, private


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_between_zoos_modules():
    edges, _ = imports(zoo_modules())
    assert cycles(edges) == []


def test_the_cycle_finder_finds_a_planted_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_imports_another_modules_private_names():
    _, private = imports(zoo_modules())
    assert private == []


def test_the_cli_parses_and_lists_commands_without_torch():
    code = (
        "import sys, zoo.cli; p = zoo.cli.build_parser(['run', 'x']); p.parse_args(['run', 'x']); "
        "print('torch' in sys.modules, 'transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]

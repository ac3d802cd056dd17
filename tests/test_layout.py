"""The package's import graph: no cycle between modules, and no product module imports tools/ or testing/.

Every `import` and `from ... import` is counted, also those inside functions (a lazy import is still a dependency).
cli.py is the one command-line front door for product and tool commands alike (`bench`, `validate` dispatch into
tools/), so it is the one product module allowed to import tools.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "qwen_tts_megakernel"
ROOT = Path(__file__).resolve().parents[1] / "src" / PACKAGE
NOT_PRODUCT = ("tools", "testing")
TOOL_DISPATCHERS = {f"{PACKAGE}.cli"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def resolve(module: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    """The package modules an ImportFrom names (the module itself, plus submodules imported by name)."""
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    return [target] + [f"{target}.{alias.name}" for alias in node.names]


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for module, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = resolve(module, path.name == "__init__.py", node)
            else:
                continue
            graph[module].update(n for n in names if n in files and n != module)
    return graph


def is_product(module: str) -> bool:
    return not any(module.startswith(f"{PACKAGE}.{part}") for part in NOT_PRODUCT)


def test_no_product_module_imports_tools_or_fixtures():
    graph = import_graph()
    bad = sorted((m, d) for m, deps in graph.items() if is_product(m) and m not in TOOL_DISPATCHERS
                 for d in deps if not is_product(d))
    assert not bad, f"product modules importing tools/testing: {bad}"


def test_import_graph_has_no_cycle():
    graph = import_graph()
    # A package's __init__ re-exporting its own submodules is not a cycle of the design: drop parent -> child edges.
    edges = {m: {d for d in deps if not d.startswith(m + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(edges[m]):
            if state.get(d) == 1:
                cycle = stack[stack.index(d):] + [d]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)


def test_the_graph_sees_real_edges():
    """The checks above would pass on an empty graph: make sure it holds the edges we know exist."""
    graph = import_graph()
    assert f"{PACKAGE}.engine.scheduler" in graph[f"{PACKAGE}.engine.synthesizer"]
    assert f"{PACKAGE}.backends.base" in graph[f"{PACKAGE}.engine.scheduler"]
    assert any(d.startswith(f"{PACKAGE}.tools") for d in graph[f"{PACKAGE}.cli"])

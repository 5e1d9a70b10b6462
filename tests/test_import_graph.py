"""The package's import graph has no cycle: data flows one way (audio -> adapter -> model + policy -> output).

Every import counts, those inside functions too (a deferred import is still a dependency); only `if TYPE_CHECKING:`
blocks, which never run, are left out. ``from audiokv_cli.x import y`` depends on ``audiokv_cli.x`` (and on
``audiokv_cli.x.y`` when that is a module).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "audiokv_cli"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_imports(tree: ast.AST):
    """Import nodes outside `if TYPE_CHECKING:` blocks."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for child in ast.walk(node))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in skipped:
            yield node


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in runtime_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level or not node.module:
                    continue
                targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                targets = [alias.name for alias in node.names]
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
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
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_checker_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    graph = import_graph()
    assert "audiokv_cli.runtime.runner" in graph and graph["audiokv_cli.runtime.inference"]  # the graph was really read
    assert cycles(graph) == []


def test_one_runtime_runs_the_model():
    """Every run goes through `runtime.run`: the commands' paths call it, and no module outside the runtime runs
    the decode loop."""
    graph = import_graph()
    for name in (
        "audiokv_cli.runtime.inference", "audiokv_cli.runtime.batching", "audiokv_cli.runtime.longform",
        "audiokv_cli.evaluation.sweep", "audiokv_cli.evaluation.cell_batch", "audiokv_cli.bench.model",
        "audiokv_cli.profiling.runner", "audiokv_cli.testing.masked_dense",
    ):
        assert "audiokv_cli.runtime" in graph[name], name
        assert "runtime.run(" in (PACKAGE.parent / (name.replace(".", "/") + ".py")).read_text(), name
    for name in graph:
        path = PACKAGE.parent / (name.replace(".", "/") + ".py")
        if not path.exists() or name in ("audiokv_cli.runtime.runner", "audiokv_cli.runtime.decoding"):
            continue
        source = path.read_text()
        assert "decode_rows(" not in source and "decode_greedy_rows(" not in source, f"{name} decodes on its own"

"""The package's import structure: no import circle among mthl_ds's modules, and a command line that answers
``--help`` and argument errors without importing torch, DeepSpeed or timm."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mthl_ds"
HEAVY = ("torch", "deepspeed", "timm", "torchvision")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the mthl_ds modules it imports anywhere in its file (top level or inside functions):
    ``from mthl_ds import x`` names the module ``mthl_ds.x``, or the package when ``x`` is defined there."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                           for a in node.names]
            else:
                continue
            deps |= {t for t in targets if t in modules and t != name}
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_circle_in_the_package():
    graph = import_graph()
    assert "mthl_ds.train" in graph and "mthl_ds.checkpoint" in graph["mthl_ds.train"]  # the graph is read
    assert cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]  # and a circle would be found
    assert cycles(graph) == []


HEAVY_AFTER = """
import sys
sys.argv = ["mthl-ds", *{argv!r}]
from mthl_ds.cli import main
try:
    code = main()
except SystemExit as e:
    code = e.code
print({{"code": code, "heavy": sorted(m for m in sys.modules if m.split(".")[0] in {heavy!r})}})
"""


@pytest.mark.parametrize("argv, code", [
    (["--help"], 0), (["stats", "--help"], 0), (["evaluate", "--help"], 0), (["predict", "--help"], 0),
    (["rehearse", "--help"], 0), (["adapt", "--help"], 0), (["bench", "--help"], 0),
    (["predict", "model.safetensors"], 2), (["evaluate"], 2), (["no-such-verb"], 2)])
def test_help_and_argument_errors_import_no_torch(argv, code):
    proc = subprocess.run([sys.executable, "-c", HEAVY_AFTER.format(argv=argv, heavy=HEAVY)],
                          capture_output=True, text=True, timeout=120)
    result = ast.literal_eval(proc.stdout.strip().splitlines()[-1])
    assert result == {"code": code, "heavy": []}, proc.stderr[-2000:]

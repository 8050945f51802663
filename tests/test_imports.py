"""The package's import structure: its layers, each importing only from the layers under it (or within
itself), no import circle among its modules, and a command line that answers ``--help`` and argument errors
without importing torch, DeepSpeed or timm."""
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


# The layers, from the ground up: a module imports only modules of its own layer or of the layers under it.
LAYERS = [
    ("foundation: errors, input geometry, recipes, the run folder's files",
     ["mthl_ds.errors", "mthl_ds.geometry", "mthl_ds.adapt_modes", "mthl_ds.config", "mthl_ds.runfiles"]),
    ("runtime: device, collectives, DeepSpeed engine, optimizer, precision shims", ["mthl_ds.runtime"]),
    ("data and MoE layers", ["mthl_ds.data", "mthl_ds.moe"]),
    ("single-device models; analysis: metrics, routing statistics, reports, plots",
     ["mthl_ds.models", "mthl_ds.analysis"]),
    ("task kinds", ["mthl_ds.tasks"]),
    ("a recipe's model", ["mthl_ds.build"]),
    ("artifacts: checkpoints, exports, surgery, a model assembled from an export", ["mthl_ds.artifacts"]),
    ("jobs: train, evaluate, predict, adapt", ["mthl_ds.aes", "mthl_ds.train", "mthl_ds.evaluate",
                                               "mthl_ds.predict", "mthl_ds.adapt"]),
    ("studies: demo, rehearse, stability, memory plan, model info, benchmarks, the synthetic world",
     ["mthl_ds.studies"]),
    ("the command line and the package's face", ["mthl_ds.cli", "mthl_ds.__main__", "mthl_ds"]),
]


def layer_of(module: str) -> int:
    """The layer of ``module``: the one naming it or, failing that, its longest named subpackage (the package
    ``mthl_ds`` itself names its ``__init__`` alone)."""
    best = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or (prefix != "mthl_ds" and module.startswith(prefix + ".")):
                if best is None or len(prefix) > best[1]:
                    best = (i, len(prefix))
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS")
    return best[0]


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} ({LAYERS[layer_of(a)][0].split(':')[0]}) imports {b} ({LAYERS[layer_of(b)][0].split(':')[0]})"
                  for a, deps in graph.items() for b in deps if layer_of(b) > layer_of(a))


def test_every_import_runs_down_the_layers():
    graph = import_graph()
    assert upward_imports({"mthl_ds.config": {"mthl_ds.train"}, "mthl_ds.train": {"mthl_ds.config"}}) == [
        "mthl_ds.config (foundation) imports mthl_ds.train (jobs)"]  # an import back up would be found
    assert {layer_of(m) for m in graph} == set(range(len(LAYERS)))  # every layer holds a module
    assert upward_imports(graph) == []


def test_no_import_circle_in_the_package():
    graph = import_graph()
    assert "mthl_ds.train" in graph and "mthl_ds.artifacts.checkpoint" in graph["mthl_ds.train"]  # the graph is read
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

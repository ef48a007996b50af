"""The library's layout, read from the source: layers that only import downwards, no import cycle (not
even through a function-level import), a docstring on every subpackage, every package installed, no
module over 600 lines, and the DAG files and light stages free of torch."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "workers" / "essp"
OPERATORS = REPO / "operators"
# Bottom to top. A module may import from its own layer and from the layers below it, never above.
LAYERS = [
    "essp", "essp.clients", "essp.stack", "essp.datasets", "essp.dataplane", "essp.deploy", "essp.training",
    "essp.evaluation", "essp.lifecycle", "essp.orchestration", "essp.bench", "essp.cli", "essp.operators",
]
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    found = {}
    for root, prefix in ((PACKAGE, "essp"), (OPERATORS, "essp.operators")):
        for path in sorted(root.rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join((prefix, *parts)).removesuffix(".__init__")
            found[name] = path
    return found


MODULES = _modules()


def _resolve(module: str, node: ast.ImportFrom | ast.Import, alias: ast.alias) -> list[str]:
    """The essp modules one import statement loads (``from essp.x import y`` loads essp.x.y if it is one)."""
    if isinstance(node, ast.Import):
        return [alias.name] if alias.name.startswith("essp") else []
    base = node.module or ""
    if node.level:  # relative: from the package of ``module``
        package = module.split(".")
        package = package[: len(package) - node.level + (1 if MODULES[module].name == "__init__.py" else 0)]
        base = ".".join([*package, *([base] if base else [])])
    if not base.startswith("essp"):
        return []
    child = f"{base}.{alias.name}"
    return [child] if child in MODULES else [base]


def import_graph() -> dict[str, set[str]]:
    """module -> the essp modules it imports anywhere in its source (top level, functions, TYPE_CHECKING)."""
    graph: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import | ast.ImportFrom):
                for alias in node.names:
                    targets.update(t for t in _resolve(module, node, alias) if t != module)
        graph[module] = targets
    return graph


GRAPH = import_graph()


def layer_of(module: str) -> int:
    best = max((layer for layer in LAYERS if module == layer or module.startswith(layer + ".")), key=len)
    if best == "essp" and module.count(".") > 1:
        raise AssertionError(f"{module} is in no layer: add its subpackage to LAYERS")
    return LAYERS.index(best)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each a cycle or several."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in graph:
                continue
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                item = stack.pop()
                on_stack.discard(item)
                component.append(item)
                if item == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_every_import_target_exists():
    missing = {f"{m} -> {t}" for m, targets in GRAPH.items() for t in targets if t not in MODULES}
    assert not missing, f"imports of essp modules that do not exist: {sorted(missing)}"


def test_the_import_graph_has_no_cycle():
    assert cycles(GRAPH) == []


def test_the_cycle_finder_finds_a_cycle():
    # The checker itself: a two-module cycle through a function-level import is found.
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    graph = dict(GRAPH)
    graph["essp.settings"] = {*graph["essp.settings"], "essp.cli.main"}
    assert any("essp.settings" in c for c in cycles(graph))


def test_layers_only_import_downwards():
    upward = sorted(f"{m} ({LAYERS[layer_of(m)]}) imports {t} ({LAYERS[layer_of(t)]})"
                    for m, targets in GRAPH.items() for t in targets if layer_of(t) > layer_of(m))
    assert not upward, "imports that go up a layer:\n" + "\n".join(upward)


def test_every_subpackage_says_what_it_owns():
    for layer in LAYERS[1:-1]:
        init = PACKAGE / layer.split(".", 1)[1] / "__init__.py"
        tree = ast.parse(init.read_text())
        doc = ast.get_docstring(tree) or ""
        assert len(doc) > 80 and "import" in doc.lower(), f"{init}: say what it owns and what it may import"
        assert len(tree.body) == 1, f"{init}: a docstring only (importing a subpackage must stay cheap)"


def test_pyproject_installs_every_package():
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    on_disk = {name for name, path in MODULES.items() if path.name == "__init__.py"}
    assert set(packages) == on_disk


def test_no_module_is_over_the_limit():
    long = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_nothing_locates_the_repository_from_its_own_file():
    users = [str(path.relative_to(REPO)) for path in MODULES.values() if "__file__" in path.read_text()]
    assert users == [], "make such paths settings (ESSP_PROJECT_DIR, ...)"


def test_no_private_reach_through():
    # `something._call(...)` from outside its class: callers use the public methods.
    pattern = re.compile(r"(?<!self)\._call\(")
    users = [f"{path.relative_to(REPO)}:{i}" for path in MODULES.values()
             for i, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert users == []


LIGHT_IMPORTS = r"""
import json, runpy, sys
from pathlib import Path
import essp.cli.main
from essp.orchestration.stages import stage_names
names = stage_names()
for dag in sorted(Path(sys.argv[1]).glob("*.py")):
    runpy.run_path(str(dag), run_name="dag_" + dag.stem)
print(json.dumps({"stages": names, "torch": "torch" in sys.modules,
                  "heavy": sorted(m for m in ("torch", "torchvision", "matplotlib") if m in sys.modules)}))
"""


@pytest.mark.slow
def test_dag_files_and_light_stages_do_not_import_torch(tmp_path):
    """Every DAG file, the `essp` command and every stage module in a fresh interpreter: no torch
    (a stage that needs it imports it when it runs), so a light stage starts in a fraction of a second."""
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path), "AIRFLOW__CORE__LOAD_EXAMPLES": "false",
           "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{tmp_path}/airflow.db"}
    done = subprocess.run([sys.executable, "-c", LIGHT_IMPORTS, str(REPO / "dags")], env=env, capture_output=True,
                          text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(result["stages"]) > 10
    assert result["heavy"] == [], f"imported by DAG files or stage modules: {result['heavy']}"

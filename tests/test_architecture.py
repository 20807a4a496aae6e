"""The package's import graph: no cycles, no import from a lower layer to a higher one and none of the top package
from inside it; the layers are docs/architecture.md's table.

Every ``import`` statement of every module is read with ``ast`` (function-level imports included: a lazy
import is still a dependency), so the test needs no import side effects.
"""

import ast
import os
import re

import pytest

PACKAGE = "optimum_edkm"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.join(REPO, PACKAGE)
ARCHITECTURE_DOC = os.path.join(REPO, "docs", "architecture.md")

#: the layers bottom up, as docs/architecture.md's table names them
BASE, CORE, MODULES, INTEGRATION, INPUTS_AND_OUTPUTS, METHODS_AND_MEASURES, RECIPES, COMMAND_LINE, TOP = range(9)
LAYER_NAMES = (
    "base",
    "core",
    "modules",
    "integration",
    "inputs and outputs",
    "methods and measures",
    "recipes",
    "command line",
    "package",
)
#: layer of each top-level module or subpackage (docs/architecture.md); imports may only go to the same or a
#: lower layer
LAYERS = {
    "validation": BASE,
    "version": BASE,
    "atomic": BASE,
    "extensions": BASE,
    "storage": BASE,
    "clustering": CORE,
    "marshaling": CORE,
    "kernels": CORE,
    "losses": CORE,
    "nn": MODULES,
    "calibration": MODULES,
    "config": INTEGRATION,
    "checkpoint": INTEGRATION,
    "quantizer": INTEGRATION,
    "api": INTEGRATION,
    "trainer": INTEGRATION,
    "models": INPUTS_AND_OUTPUTS,
    "data": INPUTS_AND_OUTPUTS,
    "baselines": INPUTS_AND_OUTPUTS,
    "peft": INPUTS_AND_OUTPUTS,
    "export": INPUTS_AND_OUTPUTS,
    "evaluation": METHODS_AND_MEASURES,
    "distillation": METHODS_AND_MEASURES,
    "sensitivity": METHODS_AND_MEASURES,
    "ptq": METHODS_AND_MEASURES,
    "reconstruction": METHODS_AND_MEASURES,
    "finetune": RECIPES,
    "pipeline": RECIPES,
    "commands": COMMAND_LINE,
    "__init__": TOP,
}


def _modules() -> dict:
    """``{dotted module name: path}`` of every module of the package."""
    found = {}
    for folder, _, files in os.walk(ROOT):
        for name in files:
            if name.endswith(".py"):
                relative = os.path.relpath(os.path.join(folder, name), os.path.dirname(ROOT))[:-3]
                dotted = relative.replace(os.sep, ".")
                found[dotted.removesuffix(".__init__") if dotted.endswith(".__init__") else dotted] = os.path.join(
                    folder, name
                )
    return found


def _imports(module: str, path: str, known: set) -> set:
    is_package = path.endswith("__init__.py")
    base = module if is_package else module.rsplit(".", 1)[0]
    edges = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                prefix = ".".join(anchor + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # ``from .. import atomic`` imports the module ``atomic``; ``from .nn import X`` the package ``nn``
            targets = [
                f"{prefix}.{alias.name}" if f"{prefix}.{alias.name}" in known else prefix for alias in node.names
            ]
        else:
            continue
        for target in targets:
            # the deepest known module the name refers to (``from .nn import X`` is the nn package)
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target.startswith(PACKAGE) and target != module:
                edges.add(target)
    return edges


def _graph() -> dict:
    modules = _modules()
    known = set(modules)
    return {module: _imports(module, path, known) for module, path in modules.items()}


def _layer(module: str) -> int:
    parts = module.split(".")
    key = parts[1] if len(parts) > 1 else "__init__"
    if key not in LAYERS:
        pytest.fail(f"{module} is not placed in a layer: add it to LAYERS (and docs/architecture.md)")
    return LAYERS[key]


def test_no_module_imports_a_higher_layer():
    graph = _graph()
    upward = sorted(
        f"{source} (layer {_layer(source)}) -> {target} (layer {_layer(target)})"
        for source, targets in graph.items()
        for target in targets
        if _layer(target) > _layer(source) and target != PACKAGE
    )
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(upward)


def _unit(module: str) -> str:
    """The top-level module or subpackage a module belongs to (``optimum_edkm.export.verify`` -> ``export``)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _cycles(edges: dict) -> list:
    """Strongly connected components of more than one node (Tarjan)."""
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in edges.get(node, ()):
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
                cycles.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return cycles


def test_the_import_graph_has_no_cycle():
    graph = _graph()
    # a subpackage's __init__ re-exporting its own modules is not a cycle of concepts; every other edge counts
    edges = {
        source: {t for t in targets if not (source.count(".") < t.count(".") and t.startswith(source + "."))}
        for source, targets in graph.items()
    }
    cycles = _cycles(edges)
    assert not cycles, "import cycles between modules:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_no_cycle_between_subpackages():
    units = {}
    for source, targets in _graph().items():
        units.setdefault(_unit(source), set()).update(
            _unit(t) for t in targets if _unit(t) not in (_unit(source), "__init__")
        )
    cycles = _cycles(units)
    assert not cycles, "import cycles between subpackages:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_no_module_imports_the_top_package():
    """The top package's ``__init__`` re-exports the public names and registers the quantizer: a module inside
    imports the module that defines what it needs, never ``optimum_edkm`` itself."""
    importers = sorted(source for source, targets in _graph().items() if PACKAGE in targets and source != PACKAGE)
    assert not importers, f"modules importing the top package {PACKAGE} (import the defining module instead): " + (
        ", ".join(importers)
    )


def _documented_layers() -> list:
    """``[(layer name, {module names})]`` of docs/architecture.md's layer table, in its order."""
    rows = []
    for line in open(ARCHITECTURE_DOC, encoding="utf-8"):
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) > 2 and re.fullmatch(r"\d+ .+", cells[0]):
            names = {name.rstrip("/") for name in re.findall(r"`([^`]+)`", cells[1])}
            rows.append((cells[0].split(" ", 1)[1], names))
    return rows


def test_the_documented_layers_are_the_tested_ones():
    documented = _documented_layers()
    assert [name for name, _ in documented] == list(LAYER_NAMES), "docs/architecture.md's layer names or order"
    for layer, (name, modules) in enumerate(documented):
        expected = {unit for unit, placed in LAYERS.items() if placed == layer}
        assert modules == expected, f"layer {layer} ({name}): docs/architecture.md lists {sorted(modules)}"
    units = {_unit(module) for module in _modules()}
    assert units == set(LAYERS), f"LAYERS places {sorted(set(LAYERS) - units)}, which do not exist"


def test_the_clustering_core_does_not_import_transformers():
    for module, path in _modules().items():
        if module.startswith(f"{PACKAGE}.clustering") or module.startswith(f"{PACKAGE}.marshaling"):
            tree = ast.parse(open(path, encoding="utf-8").read())
            names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
            names |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
            assert not any(name.split(".")[0] == "transformers" for name in names), module


def test_post_training_palettization_and_the_baselines_are_siblings_on_the_calibration_layer():
    graph = _graph()
    for source, targets in graph.items():
        if _unit(source) in ("ptq", "calibration"):
            assert not any(_unit(t) == "baselines" for t in targets), f"{source} imports the baselines"
        if _unit(source) == "calibration":
            assert all(_unit(t) in ("calibration", "validation") for t in targets), f"{source}: {sorted(targets)}"
    assert any(_unit(t) == "calibration" for s, ts in graph.items() if _unit(s) == "ptq" for t in ts)
    assert any(_unit(t) == "calibration" for s, ts in graph.items() if _unit(s) == "baselines" for t in ts)

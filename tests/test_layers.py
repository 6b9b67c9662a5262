"""The import graph of ``ssl_kd/`` follows the layers of the package docstring, with no cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "ssl_kd"

# Lowest first; the first matching prefix decides a module's layer (see ssl_kd/__init__.py).
LAYERS: list[tuple[str, ...]] = [
    (
        "ssl_kd",
        "ssl_kd.errors",
        "ssl_kd.config",
        "ssl_kd.storage",
        "ssl_kd.atomic",
        "ssl_kd.dir_lock",
        "ssl_kd.device",
        "ssl_kd.ray_internals",
        "ssl_kd.ray_cluster",
        "ssl_kd.executor",
        "ssl_kd.ray_resources",
        "ssl_kd.figures",
        "ssl_kd.cluster_config",
        "ssl_kd.stages",
    ),
    ("ssl_kd.shards", "ssl_kd.datasets"),
    ("ssl_kd.models",),
    # the stages: one layer, ordered (see STAGE_ORDER)
    (
        "ssl_kd.label",
        "ssl_kd.select",
        "ssl_kd.materialize",
        "ssl_kd.evaluate",
        "ssl_kd.train",
        "ssl_kd.inspect",
    ),
    ("ssl_kd.pipeline", "ssl_kd.cli"),
]
STAGE_LAYER = 3
STAGE_ORDER = LAYERS[STAGE_LAYER]
# What one stage may take from an earlier one: its on-disk contract (``files``), and the metrics
# of one evaluation pass, with which training validates.
SHARED_WITH_LATER_STAGES = ("files",)
SHARED_MODULES = frozenset({"ssl_kd.evaluate.metrics"})


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """Every ssl_kd module ``path`` imports, at module level or inside functions."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("ssl_kd"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if not node.module.startswith("ssl_kd"):
                continue
            for alias in node.names:  # `from ssl_kd import storage` names a module
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
    return found


def owner(module: str) -> tuple[int, str]:
    """(layer, prefix) of the longest prefix that owns ``module``."""
    best: tuple[int, str] | None = None
    for layer, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            # the root prefix owns only the package itself, not everything under it
            inside = prefix != "ssl_kd" and module.startswith(prefix + ".")
            longer = best is None or len(prefix) > len(best[1])
            if (module == prefix or inside) and longer:
                best = (layer, prefix)
    assert best is not None, f"{module} is in no layer: add it to LAYERS and the docstring"
    return best


def is_contract(module: str, stage: str) -> bool:
    """Whether another stage may import ``module`` of ``stage``."""
    contracts = {f"{stage}.{name}" for name in SHARED_WITH_LATER_STAGES}
    return module in contracts or module in SHARED_MODULES


def graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {m: imports_of(p, modules) - {m} for m, p in modules.items()}


def test_every_module_has_a_layer() -> None:
    for module in all_modules():
        owner(module)


def test_no_import_goes_up_a_layer_or_into_a_later_stage() -> None:
    wrong = []
    for module, deps in graph().items():
        layer, prefix = owner(module)
        for dep in deps:
            dep_layer, dep_prefix = owner(dep)
            if dep_layer > layer:
                wrong.append(f"{module} -> {dep} (layer {layer + 1} imports layer {dep_layer + 1})")
            elif layer == dep_layer == STAGE_LAYER and dep_prefix != prefix:
                if STAGE_ORDER.index(dep_prefix) > STAGE_ORDER.index(prefix):
                    wrong.append(f"{module} -> {dep} (a stage imports a later stage)")
                elif not is_contract(dep, dep_prefix):
                    wrong.append(f"{module} -> {dep} (a stage imports more than a contract)")
    assert not wrong, "imports against the layers:\n" + "\n".join(sorted(wrong))


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle() -> None:
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize(
    ("edges", "expected"),
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
        ({"a": {"b"}, "b": {"b"}}, ["b", "b"]),
    ],
)
def test_cycle_finder(edges: dict[str, set[str]], expected: list[str] | None) -> None:
    assert find_cycle(edges) == expected


def test_the_checker_sees_an_upward_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from ssl_kd.pipeline.plan import make_plan\n")
    modules = {"ssl_kd.pipeline.plan": bad}
    deps = imports_of(bad, modules)
    assert deps == {"ssl_kd.pipeline.plan"}
    assert owner("ssl_kd.shards.reader")[0] < owner(next(iter(deps)))[0]

"""Layering, read from the source with `ast` (nothing is imported): no import cycle among the
package's modules, and `config/` imports nothing above it.

Every import counts, at module level or inside a function, and importing `a.b.c` counts as
importing the packages `a` and `a.b` too (their `__init__` runs), except the importer's own
ancestors, which are already running.
"""

from __future__ import annotations

import ast
import os
from typing import Dict, List, Set

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = "megatron_mgrpo"
CONFIG = f"{PKG}.config"

# What config/ may import from the package outside itself: leaf modules holding a component's
# rules, which import nothing from the package beyond their own (torch-only) package.
CONFIG_MAY_IMPORT = {f"{PKG}.algorithm.modes", f"{PKG}.evaluation.catalog"}
LEAF_PACKAGES = (f"{PKG}.algorithm",)  # algorithm/__init__ imports all of algorithm/
LEAF_INITS = {f"{PKG}.algorithm", f"{PKG}.evaluation"}

# Cycles that predate this test, each a set of modules. Another branch removes this one
# (weights/files.py); when it is gone, delete it here.
KNOWN_CYCLES: list = []


def modules() -> Dict[str, str]:
    """Dotted module name -> file, for every module of the package."""
    out = {}
    for d, _, files in os.walk(os.path.join(ROOT, PKG)):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(d, f)
                name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                out[name[:-len(".__init__")] if name.endswith(".__init__") else name] = path
    return out


def imports_of(name: str, path: str, known: Set[str]) -> Set[str]:
    """The package's modules that `name` imports, anywhere in the file."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    out: Set[str] = set()

    def add(module: str) -> None:
        parts = module.split(".")
        for i in range(1, len(parts) + 1):
            m = ".".join(parts[:i])
            if m in known and m != name and not (name + ".").startswith(m + "."):
                out.add(m)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
                for _ in range(node.level - 1):
                    base = base.rsplit(".", 1)[0]
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            add(module)
            for alias in node.names:  # `from pkg import submodule`
                add(f"{module}.{alias.name}")
    return out


def import_graph() -> Dict[str, Set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(name, path, known) for name, path in mods.items()}


def cycles(graph: Dict[str, Set[str]]) -> List[Set[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[Set[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = set()
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.add(w)
                    if w == v:
                        break
                if len(component) > 1:
                    found.append(component)
    return found


def in_config(module: str) -> bool:
    return module == CONFIG or module.startswith(CONFIG + ".")


def layering_problems(graph: Dict[str, Set[str]]) -> List[str]:
    """What config/ imports (directly, or through what it imports) that lies above it."""
    problems = []
    for module in sorted(m for m in graph if in_config(m)):
        for target in sorted(graph[module]):
            if in_config(target) or target == PKG or target in CONFIG_MAY_IMPORT:
                continue
            if any(allowed.startswith(target + ".") for allowed in CONFIG_MAY_IMPORT):
                continue  # the package of an allowed leaf (its __init__ is checked below)
            problems.append(f"{module} imports {target}")
    reached, todo = set(), [m for m in graph if in_config(m)]
    while todo:
        for target in graph[todo.pop()]:
            if target not in reached:
                reached.add(target)
                todo.append(target)
    for module in sorted(reached):
        leaf = (in_config(module) or module == PKG or module in CONFIG_MAY_IMPORT
                or module in LEAF_INITS or module.startswith(tuple(p + "." for p in LEAF_PACKAGES)))
        if not leaf:
            problems.append(f"config/ reaches {module} through the leaves it imports")
    return problems


def test_no_import_cycles():
    graph = import_graph()
    # The graph sees module-level imports and function-local ones (plan.py's).
    assert f"{PKG}.config.schema" in graph[f"{PKG}.update"]
    assert f"{PKG}.models.architecture" in graph[f"{PKG}.plan"]
    found = cycles(graph)
    new = [sorted(c) for c in found if c not in KNOWN_CYCLES]
    assert not new, f"import cycles among the package's modules: {new}"
    gone = [sorted(c) for c in KNOWN_CYCLES if c not in found]
    assert not gone, f"these known cycles are gone: delete them from KNOWN_CYCLES: {gone}"


def test_config_imports_nothing_above_it():
    problems = layering_problems(import_graph())
    assert not problems, "config/ must not import the components that read it:\n" + \
        "\n".join(problems)


def test_the_checks_catch_a_reintroduced_cycle():
    """The two cycles this layering removed, put back into the graph, are caught."""
    graph = import_graph()
    for above in (f"{PKG}.models.architecture", f"{PKG}.update"):
        broken = {k: set(v) for k, v in graph.items()}
        broken[f"{PKG}.config.schema"].add(above)
        assert any({above, f"{PKG}.config.schema"} <= c for c in cycles(broken))
        assert f"{PKG}.config.schema imports {above}" in layering_problems(broken)


def test_config_names_what_its_components_accept():
    """Values a section's Literal lists, or checks against, are the owning component's."""
    import typing

    from megatron_mgrpo.algorithm.modes import MODES
    from megatron_mgrpo.config import AlgorithmConfig
    from megatron_mgrpo.evaluation.benchmarks import BENCHMARKS
    from megatron_mgrpo.evaluation.catalog import BENCHMARK_NAMES

    assert typing.get_args(typing.get_type_hints(AlgorithmConfig)["mode"]) == MODES
    assert tuple(BENCHMARKS) == BENCHMARK_NAMES

"""The package imports in any order and its layers point one way (issue 14, item 1).

Read from the source (ast), every `import` of a megatron_patch module: those at module level decide whether
import order can matter (a cycle among them is a half-initialised module for whoever comes first); those in
functions too decide the layering. Plus one fresh interpreter importing every module, last name first."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "megatron_patch"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(node, module: str, is_package: bool) -> list[tuple[str, list[str]]]:
    if isinstance(node, ast.Import):
        return [(a.name, []) for a in node.names]
    base = module if is_package else module.rpartition(".")[0]
    if node.level:
        base = ".".join(base.split(".")[:len(base.split(".")) - node.level + 1])
        name = f"{base}.{node.module}" if node.module else base
    else:
        name = node.module or ""
    return [(name, [a.name for a in node.names])]  # `from pkg import x`: x is a module of pkg or a name in it


def _imports(path: Path, module: str) -> tuple[set[str], set[str]]:
    """(imported at module level, imported anywhere): (dotted name, names imported from it), megatron_patch's only."""
    top, anywhere = set(), set()

    def visit(node, in_function: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                names = {(n, tuple(what)) for n, what in _imported(child, module, path.name == "__init__.py")
                         if n.split(".")[0] == PACKAGE}
                anywhere.update(names)
                if not in_function:
                    top.update(names)
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(path.read_text()), False)
    return top, anywhere


@pytest.fixture(scope="module")
def graph():
    modules = {_module_name(p): p for p in (ROOT / PACKAGE).rglob("*.py")}

    def resolve(imported) -> set[str]:
        name, what = imported  # `from a.b import c`: the module a.b.c, or a name in a.b
        subs = {f"{name}.{w}" for w in what if f"{name}.{w}" in modules}
        if len(subs) < len(what) or not what:
            while name not in modules:
                name = name.rpartition(".")[0]
            subs.add(name)
        return subs

    top, anywhere = {}, {}
    for name, path in modules.items():
        t, a = _imports(path, name)
        top[name] = set().union(*map(resolve, t)) - {name}
        anywhere[name] = set().union(*map(resolve, a)) - {name}
    return modules, top, anywhere


def _cycles(edges: dict[str, set[str]], among=None) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), restricted to `among`."""
    nodes = [n for n in edges if among is None or among(n)]
    keep = set(nodes)
    index, low, stack, on, found = {}, {}, [], set(), []

    def strong(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v] & keep:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while not comp or comp[-1] != v:
                comp.append(stack.pop())
                on.discard(comp[-1])
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in nodes:
        if v not in index:
            strong(v)
    return found


def _in(*subpackages):
    return lambda name: name.split(".")[1:2] and name.split(".")[1] in subpackages


def test_module_level_imports_form_no_cycle(graph):
    """No module needs another to be imported first: the order of imports cannot matter."""
    _, top, _ = graph
    assert _cycles(top) == []


def test_io_layer_and_converters_are_no_import_circle(graph):
    """checkpoint/ and convert/ hold no cycle even through imports inside functions (convert/ was one:
    hf2mcore <-> mcore2hf <-> dist_reader <-> dist_writer)."""
    _, _, anywhere = graph
    assert _cycles(anywhere, _in("checkpoint", "convert")) == []


# Lowest first. A module may import its own package and the layers below it, never a layer above nor a
# sibling in the same layer (training, verify and convert are peers). testing/ serves the tests and tools only.
LAYERS = (("errors",), ("runtime",), ("models",), ("checkpoint",), ("data",), ("training", "verify", "convert"),
          ("cli", ""), ("testing",))
LEVEL = {package: level for level, packages in enumerate(LAYERS) for package in packages}


def _package(module: str) -> str:
    """megatron_patch.X.y -> X; the top-level package itself -> ""."""
    return (module.split(".") + [""])[1]


def _upward(importer: str, imported: str) -> bool:
    a, b = _package(importer), _package(imported)
    return a != b and LEVEL[b] >= LEVEL[a]


def test_layering_rule_flags_the_imports_it_was_written_for():
    """The two upward imports this table was written to catch (issue 14): data/ took the training batch from
    training.step, runtime/preflight called into training/ and verify/; and the peers may not import each other."""
    assert _upward("megatron_patch.data.gpt", "megatron_patch.training.step")
    assert _upward("megatron_patch.runtime.preflight", "megatron_patch.verify.compare")
    assert _upward("megatron_patch.training.trainer", "megatron_patch.verify.compare")
    assert _upward("megatron_patch.checkpoint.engine", "megatron_patch.testing.equivalence")
    assert not _upward("megatron_patch.training.step", "megatron_patch.data.batch")
    assert not _upward("megatron_patch.cli", "megatron_patch.errors")


def test_layers_point_one_way(graph):
    """Every import of every module, also those inside functions, points down the table (or stays in its own
    package); every subpackage has a place in it."""
    modules, _, anywhere = graph
    assert {_package(m) for m in modules} <= set(LEVEL), "a new subpackage: give it a layer in LAYERS"
    upward = sorted((m, n) for m in modules for n in anywhere[m] if _upward(m, n))
    assert upward == []
    assert "megatron_patch.checkpoint.chunks" in anywhere["megatron_patch.training.checkpointing"]  # the walk sees imports


def test_every_module_imports_in_a_fresh_interpreter(graph):
    """Last name first (a subpackage's modules before the package they live in): a module that only imports
    when another was imported before it fails here."""
    modules, _, _ = graph
    names = sorted(modules, reverse=True)
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\nprint(len(sys.argv) - 1)"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TORCHDYNAMO_DISABLE": "1"}
    proc = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, env=env, timeout=300,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-1] == str(len(names))

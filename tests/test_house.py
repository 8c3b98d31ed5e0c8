"""The package's structure (docs/DESIGN.md section 10): small rooms with one job each.

Read from the source with ``ast``, so they hold for every change: no import cycle among the
package's modules (lazy imports inside functions count too), no function over 60 lines (its
docstring aside) or of cyclomatic complexity over 15, and ``optimizer.py`` (the public API and
the state machine) at most 450 lines. Each check is also run on a small bad example, so that a
check which could not fail would fail here.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ivon_fast"
MAX_LINES, MAX_COMPLEXITY, OPTIMIZER_LINES = 60, 15, 450

# docs/DESIGN.md section 10's layers: a module imports from its own layer or the ones below
LAYERS = {
    0: ("backends", "reference", "triton_backend", "cpp_backend", "_contract", "_fake_ops",
        "_extension", "_build_info", "scalars"),
    1: ("_op_loop", "_layout", "_bucket", "_sharded"),
    2: ("_step", "_blocks", "_user_writes", "_groups", "_checkpoint", "_ivon_opt_export",
        "_checks", "_draws",
        "noise", "posterior", "_messages", "_wrappers"),
    3: ("optimizer",),
    4: ("", "__main__", "predictive", "integrations", "integrations.hf",
        "integrations.lightning"),
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> dict:
    return {_module_name(path): path.read_text() for path in sorted(PACKAGE.rglob("*.py"))}


def import_graph(sources: dict) -> dict:
    """{module: the package's modules it imports, anywhere in its code}."""
    graph = {}
    for module, source in sources.items():
        is_package = any(other.startswith(module + ".") for other in sources)
        package = module if is_package else module.rsplit(".", 1)[0]
        targets = set()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                names = [f"{base}.{alias.name}" for alias in node.names]
                targets.update(name if name in sources else base for name in names)
            elif isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
        graph[module] = {target for target in targets if target in sources} - {module}
    return graph


def cycles(graph: dict) -> list:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
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

    for node in graph:
        if node not in index:
            visit(node)
    return found


def complexity(function: ast.AST) -> int:
    """McCabe's cyclomatic complexity: 1 + every branch (if, loop, except, ternary, assert,
    each extra operand of and / or, each comprehension loop and condition, match case)."""
    count = 1
    for node in ast.walk(function):
        if isinstance(node, (ast.If, ast.IfExp, ast.For, ast.AsyncFor, ast.While,
                             ast.ExceptHandler, ast.Assert, ast.match_case)):
            count += 1
        elif isinstance(node, ast.BoolOp):
            count += len(node.values) - 1
        elif isinstance(node, ast.comprehension):
            count += 1 + len(node.ifs)
    return count


def length(function: ast.AST) -> int:
    """Lines of a function's body, its docstring aside."""
    body = function.body
    has_docstring = (isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                     and isinstance(body[0].value.value, str))
    if has_docstring and len(body) == 1:
        return 0
    first = body[1] if has_docstring else body[0]
    start = min([first.lineno] + [d.lineno for d in getattr(first, "decorator_list", [])])
    return function.end_lineno - start + 1


def oversized(source: str) -> list:
    """(name, lines, complexity) of every function over the limits."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines, branches = length(node), complexity(node)
            if lines > MAX_LINES or branches > MAX_COMPLEXITY:
                found.append((node.name, lines, branches))
    return found


def test_no_import_cycles():
    """No module of the package imports, directly or through others, one that imports it."""
    assert cycles(import_graph(_sources())) == []


def _layer_of() -> dict:
    return {("ivon_fast." + name).rstrip("."): layer
            for layer, names in LAYERS.items() for name in names}


def upward_imports(graph: dict, layer_of: dict) -> list:
    return sorted((module, target) for module, targets in graph.items() for target in targets
                  if layer_of[target] > layer_of[module])


def test_imports_only_go_down_the_layers():
    """Every module has a layer (DESIGN section 10's picture), and imports nothing above it."""
    graph, layer_of = import_graph(_sources()), _layer_of()
    assert sorted(set(graph) - set(layer_of)) == [], "a module without a layer"
    assert upward_imports(graph, layer_of) == []


def test_the_layer_check_finds_an_upward_import():
    """The reference importing the optimizer is reported (the check can fail)."""
    graph = {"ivon_fast.reference": {"ivon_fast.optimizer"}, "ivon_fast.optimizer": set()}
    assert upward_imports(graph, _layer_of()) == [("ivon_fast.reference", "ivon_fast.optimizer")]


def test_the_cycle_check_finds_a_cycle():
    """A lazy import back into an importer is a cycle (the check can fail)."""
    sources = {"ivon_fast": "", "ivon_fast.a": "from . import b\n",
               "ivon_fast.b": "def f():\n    from .a import g\n"}
    assert cycles(import_graph(sources)) == [["ivon_fast.a", "ivon_fast.b"]]


@pytest.mark.parametrize("module", sorted(_sources()))
def test_functions_are_small(module):
    """Every function of the module: at most 60 lines, cyclomatic complexity at most 15."""
    assert oversized(_sources()[module]) == []


def test_the_size_checks_find_a_big_function():
    """A 61-line function and one of 16 branches are reported (the checks can fail)."""
    long = "def f():\n" + "    x = 1\n" * 61
    branchy = "def g(x):\n" + "".join(f"    if x == {i}:\n        return {i}\n" for i in range(15))
    assert oversized(long) == [("f", 61, 1)]
    assert oversized(branchy) == [("g", 30, 16)]


def test_the_optimizer_module_keeps_to_the_api_and_the_state_machine():
    """optimizer.py: the public API and the pending-sample state machine, at most 450 lines."""
    lines = (PACKAGE / "optimizer.py").read_text().count("\n")
    assert lines <= OPTIMIZER_LINES, lines


def test_every_mutation_row_finds_its_text():
    """Each row of tests/mutate.py finds its text exactly once in its file, so a refactor that
    moves the code fails here, in CI, and not only when someone runs the mutation check."""
    import mutate
    failures = []
    for mutation in mutate.MUTATIONS:
        try:
            mutate._apply(mutate.REPO, mutation, write=False)
        except mutate.SetupError as error:
            failures.append(str(error))
    assert failures == []

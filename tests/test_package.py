"""The shape of the package: no import cycles between its modules, no function too long to read
at a glance. Read from the source with `ast`, so an import inside a function counts too."""

import ast
from pathlib import Path

import lightningdot

SRC = Path(lightningdot.__file__).parent
LONGEST = 80  # lines of a function, decorators and docstring included


def modules() -> dict[str, ast.Module]:
    found = {}
    for path in SRC.rglob("*.py"):
        name = ".".join(("lightningdot", *path.relative_to(SRC).with_suffix("").parts))
        found[name.removesuffix(".__init__")] = ast.parse(path.read_text(encoding="utf-8"))
    return found


def imports(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """The package's modules that module `name` imports, anywhere in it."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{name} imports relatively; the package imports absolutely"
            targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        else:
            continue
        out |= {t for t in targets if t in known and t != name}
    return out


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of the graph, as the modules along it, or None."""
    state: dict[str, str] = {}  # "open" while on the path, "done" after

    def visit(m: str, path: list[str]) -> list[str] | None:
        state[m] = "open"
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                return [*path[path.index(n) :], n]
            if n not in state and (found := visit(n, [*path, n])):
                return found
        state[m] = "done"
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m, [m])):
            return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_imports_one_that_imports_it_back():
    found = modules()
    graph = {name: imports(name, tree, set(found)) for name, tree in found.items()}
    assert len(graph) > 40 and graph["lightningdot.cli"]  # the walk did find the package
    assert cycle(graph) is None, " -> ".join(cycle(graph) or [])


def test_no_function_is_longer_than_a_screen():
    long = [
        f"{name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for name, tree in modules().items()
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > LONGEST
    ]
    assert not long, long

"""The project's layers, read from its source: imports point down only. The core (edit_jax, but
its CLI) never imports training, evaluation, the pipelines, the converters or the CLI, and no
modules import each other in a circle, function-local imports included (one hidden inside a
function still makes a circle)."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("edit_jax", "train", "eval", "pipelines", "checkpoints_convert")
ABOVE_THE_CORE = ("train", "eval", "pipelines", "checkpoints_convert", "edit_jax.cli")


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            modules[name.removesuffix(".__init__")] = path
    return modules


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports anywhere in its source. `from a import b` is an
    import of the module a.b when there is one (as import linters read it), else of a."""
    modules = project_modules()

    def module_of(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(module_of(alias.name) for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets.update(module_of(f"{node.module}.{alias.name}") if f"{node.module}.{alias.name}" in modules
                               else module_of(node.module) for alias in node.names)
        graph[name] = {t for t in targets if t is not None and t != name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_modules_import_each_other_in_a_circle():
    graph = import_graph()
    found = circles(graph)
    described = ["; ".join(f"{m} -> {', '.join(sorted(graph[m] & set(c)))}" for m in c) for c in found]
    assert not found, "import circles:\n" + "\n".join(described)


def test_the_core_never_imports_what_sits_above_it():
    upward = {name: sorted(t for t in targets if t.startswith(ABOVE_THE_CORE))
              for name, targets in import_graph().items()
              if name.startswith("edit_jax") and not name.startswith("edit_jax.cli")}
    assert not {k: v for k, v in upward.items() if v}


def test_the_circle_check_finds_a_circle_and_names_its_modules():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []

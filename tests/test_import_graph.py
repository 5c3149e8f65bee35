"""The project's layers, read from its source: imports point down only. The core (edit_jax, but
its CLI) never imports training, evaluation, the pipelines, the converters or the CLI, and no
modules import each other in a circle, function-local imports included (one hidden inside a
function still makes a circle)."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# folder -> the package it installs as (pyproject.toml's package-dir)
PACKAGES = {"edit_jax": "edit_jax", "train": "edit_jax.train", "eval": "edit_jax.eval", "pipelines": "edit_jax.pipelines",
            "checkpoints_convert": "edit_jax.checkpoints_convert"}
ABOVE_THE_CORE = tuple(name for name in PACKAGES.values() if name != "edit_jax") + ("edit_jax.cli",)


def project_modules() -> dict[str, Path]:
    modules = {}
    for folder, package in PACKAGES.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            name = ".".join((package, *path.relative_to(REPO / folder).with_suffix("").parts))
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
              if not name.startswith(ABOVE_THE_CORE)}
    assert not {k: v for k, v in upward.items() if v}


def test_the_circle_check_finds_a_circle_and_names_its_modules():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_a_package_by_a_bare_top_level_name():
    """train, eval, pipelines and checkpoints_convert install as subpackages of edit_jax only: a
    bare `import train` would load a second copy of a module, or a user's own package of that name."""
    bare = {}
    for name, path in {**project_modules(), **{f"tests.{p.stem}": p for p in (REPO / "tests").glob("*.py")}}.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            bare[name] = bare.get(name, []) + [n for n in names if n.split(".")[0] in set(PACKAGES) - {"edit_jax"}]
    assert not {k: v for k, v in bare.items() if v}


def test_a_built_wheel_installs_edit_jax_as_its_only_top_level_package(tmp_path):
    import shutil
    import subprocess
    import sys
    import zipfile

    source = tmp_path / "src"  # a copy: a build writes build/ and egg-info beside the sources (setuptools: the test extra)
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for folder in PACKAGES:
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    "-w", str(tmp_path / "dist"), str(source)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"edit_jax"}
    assert {"edit_jax/train/loop.py", "edit_jax/eval/demo.py", "edit_jax/pipelines/generate.py",
            "edit_jax/checkpoints_convert/convert.py"} <= set(names)


def test_every_public_function_with_four_or_more_parameters_has_an_args_section():
    """Names: the project's functions say what each argument is (shapes, units) under `Args:`."""
    lacking = []
    for name, path in project_modules().items():
        tree = ast.parse(path.read_text())
        functions = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
        functions += [f for c in tree.body if isinstance(c, ast.ClassDef) and not c.name.startswith("_")
                      for f in c.body if isinstance(f, ast.FunctionDef)]
        for fn in functions:
            params = [a.arg for a in fn.args.args + fn.args.kwonlyargs if a.arg not in ("self", "cls")]
            if not fn.name.startswith("_") and len(params) >= 4 and "Args:" not in (ast.get_docstring(fn) or ""):
                lacking.append(f"{name}.{fn.name}")
    assert not lacking, lacking


def test_the_cli_and_every_command_module_import_without_the_optional_dependencies():
    """README's first command installs no torch: the CLI, which imports every command's module at its
    top, must not need torch, diffusers, transformers, diffrax, tokamax or libtpu to start."""
    import subprocess
    import sys

    script = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("torch", "diffusers", "transformers", "diffrax", "tokamax", "libtpu"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Block())
import edit_jax.cli
edit_jax.cli.build_parser()
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

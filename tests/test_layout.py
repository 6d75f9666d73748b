"""The package's layers, read from its source: the library (vae_ext/ and vae_ext/models/) never imports
the command (vae_ext/cli/), imports have no circle, every module says on its first line what it is
for, and the packaging ships every subpackage.

Static (ast) on purpose: a lazy import inside a function is an edge too, and it is the kind that
hid the last circle (models.py and architectures.py imported each other). tests/test_extras.py
checks the same boundary at run time: ``import vae_ext`` and the models load nothing of vae_ext.cli.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "vae_ext"
COMMAND = "vae_ext.cli"
# python -m vae_ext: the command's entry point, which forwards to vae_ext.cli (not a library module)
ENTRY_POINTS = {"vae_ext.__main__"}
EXTENSIONS = {"vae_ext._C"}  # compiled: imports nothing of the package


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _imports(name: str) -> set:
    """The vae_ext modules that ``name`` imports anywhere in its source (module level or lazily)."""
    tree = ast.parse(MODULES[name].read_text())
    package = name if _is_package(name) else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # `from pkg import name`: the submodule pkg.name where there is one, else pkg itself
            targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in MODULES.keys() | EXTENSIONS else source
                       for a in node.names]
        else:
            continue
        for t in targets:
            if t in EXTENSIONS:
                continue
            while t and t not in MODULES:  # an attribute (`import a.b` of a name in a): its module
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


GRAPH = {name: _imports(name) for name in MODULES}


def _in_command(name: str) -> bool:
    return name == COMMAND or name.startswith(COMMAND + ".")


def test_the_tree_has_both_halves():
    """The walk below sees the modules it is about (a test of an empty tree would pass)."""
    assert {"vae_ext", "vae_ext.functional", "vae_ext.models", "vae_ext.models.base", "vae_ext.cli",
            "vae_ext.cli.command", "vae_ext.cli.train"} <= set(MODULES)
    assert "vae_ext.models" in GRAPH["vae_ext.cli.train"]  # from ..models import VAE
    assert {"vae_ext.functional", "vae_ext.reference"} <= GRAPH["vae_ext.models.base"]  # from .. import ...


@pytest.mark.parametrize("name", [n for n in MODULES if not _in_command(n) and n not in ENTRY_POINTS])
def test_the_library_never_imports_the_command(name):
    assert not {t for t in GRAPH[name] if _in_command(t)}, f"{name} imports the command's package"


def test_the_import_graph_sees_the_command():
    """The check above can fail: the entry point's import of vae_ext.cli is found."""
    assert any(_in_command(t) for t in GRAPH["vae_ext.__main__"])


def _cycle():
    """One import circle among the vae_ext modules, as a list of names, or None."""
    state = {}

    def visit(n, path):
        state[n] = "open"
        for m in sorted(GRAPH[n]):
            if state.get(m) == "open":
                return path[path.index(m):] + [m]
            if m not in state:
                found = visit(m, path + [m])
                if found:
                    return found
        state[n] = "done"
        return None

    for n in sorted(GRAPH):
        if n not in state:
            found = visit(n, [n])
            if found:
                return found
    return None


def test_no_import_circle():
    cycle = _cycle()
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_circle_check_finds_a_circle():
    saved = GRAPH["vae_ext.models.base"]
    GRAPH["vae_ext.models.base"] = saved | {"vae_ext.models.mlp"}  # mlp imports base: a circle
    try:
        assert _cycle() is not None
    finally:
        GRAPH["vae_ext.models.base"] = saved


@pytest.mark.parametrize("name", list(MODULES))
def test_each_module_says_what_it_is_for(name):
    doc = ast.get_docstring(ast.parse(MODULES[name].read_text()))
    assert doc and len(doc.split()) >= 4, f"{MODULES[name]}: no docstring saying what the module is for"


def test_the_packaging_ships_every_subpackage():
    """pyproject.toml's package discovery finds each folder of vae_ext that holds an __init__.py."""
    import tomllib  # Python >= 3.11
    from setuptools import find_packages

    find = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    found = set(find_packages(str(REPO), include=find.get("include", ["*"]), exclude=find.get("exclude", ())))
    wanted = {n for n in MODULES if _is_package(n)}
    assert wanted == {"vae_ext", "vae_ext.cli", "vae_ext.models"}
    assert wanted <= found, sorted(wanted - found)

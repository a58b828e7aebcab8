"""The code stays readable: no function longer than 60 lines and no module longer than 400, in the
package, the scripts and their benchmark stages; no import cycle in the package; no library module
raises SystemExit or prints `error:` itself (only a command's main, through config.run_command),
and only the command layer reads the command line (regionspot_pl.config, jsonargparse)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "regionspot_pl"
MAX_LINES = 60
MAX_MODULE_LINES = 400
CODE = sorted([*SRC.rglob("*.py"), *(ROOT / "scripts").rglob("*.py")])
RUN_COMMAND = SRC / "config" / "run.py"
# The command layer: the glue, and each command's entry module (its settings modules are plain
# dataclasses that library code imports too).
COMMAND_LAYER = {
    *(p.relative_to(SRC).as_posix() for p in (SRC / "config").glob("*.py")),
    *("fit.py", "test.py", "evaluate.py", "convert.py", "tiny.py", "extract/cli.py", "predict/cli.py", "serve/cli.py"),
    "demo/scenes.py",  # the demo data's generator and its command
}


def test_the_code_globs_find_the_package_and_the_scripts():
    assert {"regionspot_pl", "scripts", "benchmarks"} <= {p.parent.name for p in CODE}


@pytest.mark.parametrize("path", CODE, ids=lambda p: str(p.relative_to(ROOT)))
def test_functions_and_modules_are_short(path):
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_MODULE_LINES, "split the module by concept"
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(ast.parse(text))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > MAX_LINES
    ]
    assert not long, f"split into named steps: {long}"


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_errors_go_through_the_command_layer(path):
    tree = ast.parse(path.read_text())
    raises_exit = [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Raise) and node.exc is not None and "SystemExit" in ast.unparse(node.exc)
    ]
    assert not raises_exit, f"raise a RegionSpotError instead of SystemExit (lines {raises_exit})"
    if path != RUN_COMMAND:
        printed = [
            node.lineno
            for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("error:")
        ]
        assert not printed, f"leave the `error:` line to config.run_command (lines {printed})"


def _imported_modules(path: Path) -> set[str]:
    """Absolute names of the modules ``path`` imports, at module level or in functions."""
    package = ".".join(("regionspot_pl", *path.relative_to(SRC).parent.parts))
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            found |= {module, *(f"{module}.{alias.name}" for alias in node.names)}
    return found


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_only_the_command_layer_reads_the_command_line(path):
    glue = {
        m for m in _imported_modules(path) if m.split(".")[0] == "jsonargparse" or m.startswith("regionspot_pl.config")
    }
    if path.relative_to(SRC).as_posix() not in COMMAND_LAYER:
        assert not glue, f"a library module imports the command layer's {sorted(glue)}: take plain settings"


def test_the_command_layer_list_names_real_modules():
    assert all((SRC / name).is_file() for name in COMMAND_LAYER)
    assert any("jsonargparse" in _imported_modules(SRC / name) for name in COMMAND_LAYER)


def _module_name(path: Path) -> str:
    parts = ("regionspot_pl", *path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_import_cycles():
    modules = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph = {
        name: {m for m in _imported_modules(path) if m in modules and not name.startswith(m + ".") and m != name}
        for name, path in modules.items()
    }  # a package's own __init__ imported by its modules is no cycle of ideas
    done: set[str] = set()

    def visit(node: str, stack: list[str]) -> None:
        for dep in sorted(graph[node]):
            if dep in stack:
                pytest.fail("import cycle: " + " -> ".join([*stack[stack.index(dep) :], dep]))
            if dep not in done:
                visit(dep, [*stack, dep])
        done.add(node)

    for name in sorted(graph):
        visit(name, [name])

"""The code stays readable: no function in the package is longer than 60 lines, no library module
raises SystemExit or prints `error:` itself (only a command's main, through config.run_command),
and only the command layer reads the command line (regionspot_pl.config, jsonargparse)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "regionspot_pl"
MAX_LINES = 60
RUN_COMMAND = SRC / "config" / "run.py"
# The command layer: the glue, and each command's entry module (its settings modules are plain
# dataclasses that library code imports too).
COMMAND_LAYER = {
    *(p.relative_to(SRC).as_posix() for p in (SRC / "config").glob("*.py")),
    *("fit.py", "test.py", "evaluate.py", "convert.py", "tiny.py", "extract/cli.py", "predict/cli.py"),
    "demo/scenes.py",  # the demo data's generator and its command
}


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_functions_are_short_and_errors_go_through_the_cli(path):
    tree = ast.parse(path.read_text())
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > MAX_LINES
    ]
    assert not long, f"split into named steps: {long}"
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

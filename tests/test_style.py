"""The code stays readable: no function in the package is longer than 60 lines, and no library
module raises SystemExit or prints `error:` itself (only a command's main, through cli.run_command)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "regionspot_pl"
MAX_LINES = 60


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
    if path.name != "cli.py":
        printed = [
            node.lineno
            for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("error:")
        ]
        assert not printed, f"leave the `error:` line to cli.run_command (lines {printed})"

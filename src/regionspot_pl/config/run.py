"""A command's ``main``: parse its settings, run them, and turn what a user can fix into one line."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import RegionSpotError
from ..utils.stopping import Stopped, stop_on_signals
from .command import Command


def run_command(
    command: Command,
    argv: Sequence[str] | None,
    run: Callable[[Any], int],
    stop_hint: str = "",
    signals: bool = True,
) -> int:
    """Parse and check the settings, then ``run`` them; the exit code.

    ``--help`` and ``--print_config`` print and return 0. A :class:`RegionSpotError` (a bad flag,
    key, file or input) becomes one ``error: ...`` line on stderr and exit code 2. Within
    ``signals``, SIGTERM/SIGINT stop the run (``stop_hint`` says what is left) with exit code
    128 + the signal number.
    """
    try:
        try:
            settings = command.parse(argv)
        except SystemExit as done:  # --help, --print_config
            return int(done.code or 0)
        if not signals:
            return run(settings)
        with stop_on_signals():
            return run(settings)
    except Stopped as stop:
        print(f"{stop}{': ' + stop_hint if stop_hint else ''}", file=sys.stderr)
        return stop.exit_code
    except RegionSpotError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

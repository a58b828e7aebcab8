"""The command layer's glue, on jsonargparse: only command modules and their settings import it.

Each command's settings are one dataclass (fields, defaults, help as docstrings, ranges as
``Annotated[..., Range(...)]``, choices as ``Literal``); :class:`Command` reads them from the
defaults, YAML files (``--config FILE``, a preset such as ``fit --stage warmup``) and flags, and
:func:`run_command` runs a command with one ``error:`` line (exit code 2) for bad input and exit
code 128 + N on signal N. The presets ship in ``presets/{data,fit,test}/*.yaml``.
"""

from .command import Command
from .files import PRESETS, find_preset, preset_names
from .messages import ConfigError
from .run import run_command

__all__ = ["PRESETS", "Command", "ConfigError", "find_preset", "preset_names", "run_command"]

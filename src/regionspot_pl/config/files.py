"""The YAML files a command reads: ``--config FILE`` and the presets (``fit --stage warmup``).

A preset NAME of kind K (``data``, ``fit``, ``test``) is ``./configs/K/NAME.yaml`` when the
working directory has one (a copy with your own paths), else the one shipped in this package
(``regionspot_pl/config/presets/K/NAME.yaml``). Each file is applied where it stands on the
command line, as jsonargparse applies ``--config``: flags after it override it, flags before it
are overridden by it. A file whose keys or values are wrong fails as it is read, naming itself.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jsonargparse import ActionConfigFile, Namespace

from .messages import ConfigError, explain

PRESETS = Path(__file__).resolve().parent / "presets"


def preset_names(kind: str) -> list[str]:
    """The presets of a kind shipped in the package, e.g. ['advanced', 'demo', 'warmup']."""
    return sorted(p.stem for p in (PRESETS / kind).glob("*.yaml"))


def find_preset(kind: str, name: str) -> Path:
    """``./configs/{kind}/{name}.yaml`` if the working directory has it, else the shipped preset."""
    for root in (Path.cwd() / "configs", PRESETS):
        path = root / kind / f"{name}.yaml"
        if path.is_file():
            return path
    raise ConfigError(
        f"no preset {name!r}: neither ./configs/{kind}/{name}.yaml nor a shipped one "
        f"(shipped: {', '.join(preset_names(kind)) or 'none'})"
    )


def apply_file(parser: Any, namespace: Namespace, path: str | Path) -> None:
    """Merge the YAML file ``path`` into ``namespace``; its types and choices are checked now, so
    that an error names the file (keys and ranges: once the whole command line is read)."""
    if not Path(path).is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        ActionConfigFile.apply_config(parser, namespace, "config", str(path))
    except (argparse.ArgumentError, TypeError, KeyError, ValueError) as err:
        raise ConfigError(explain(str(err), parser, file=str(path))) from None


class ConfigFile(ActionConfigFile):
    """``--config FILE``: jsonargparse's, with the file's errors naming the file."""

    def __call__(self, parser: Any, namespace: Namespace, values: Any, option_string: str | None = None) -> None:
        apply_file(parser, namespace, values)


class Preset(argparse.Action):
    """``--stage NAME`` (or ``--split``, ``--preset``): the preset file of that name, applied as
    ``--config`` is; ``implies(NAME)`` gives settings the name stands for where no earlier
    source set them (test's ``--split S``: ``out`` runs/test/S)."""

    def __init__(self, kind: str, implies: Callable[[str], dict] | None = None, **kwargs: Any) -> None:
        self.kind, self.implies = kind, implies
        super().__init__(default=argparse.SUPPRESS, metavar="NAME", **kwargs)

    def __call__(self, parser: Any, namespace: Namespace, values: Any, option_string: str | None = None) -> None:
        path = find_preset(self.kind, values)
        for key, value in (self.implies(values) if self.implies else {}).items():
            if namespace.get(key) is None:
                namespace[key] = value
        apply_file(parser, namespace, path)

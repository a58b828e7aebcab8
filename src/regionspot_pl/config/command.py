"""A command's settings: one dataclass, read by jsonargparse from its defaults, YAML and flags.

Flags are the dataclass's field names as written (``--max_steps``); a nested dataclass is a
group whose flags carry its name (``--data.batch_size``) and whose YAML keys nest under it
(``data: {batch_size: 4}``). Fields without a default are positional arguments (``evaluate GT
RESULTS``). ``--config FILE`` reads YAML, ``--print_config`` prints the resolved settings as YAML
that ``--config`` reads back, and a preset flag (``fit --stage warmup``) reads a shipped YAML.
The settings are then built: each dataclass checks its own ranges (:mod:`regionspot_pl.checks`),
then the command's ``check()`` the rules across settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from jsonargparse import ArgumentParser, DefaultHelpFormatter, Namespace, set_parsing_settings

from ..utils.checks import SettingError
from .files import ConfigFile, Preset, find_preset
from .messages import ConfigError, explain, origin

set_parsing_settings(docstring_parse_attribute_docstrings=True)  # --help: each field's docstring


class HelpFormatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """jsonargparse's help, with the command's description laid out as written."""


def _is_settings(hint: Any) -> bool:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


def instantiate(schema: type, values: Namespace, prefix: str = "") -> Any:
    """The dataclass ``schema`` (nested ones first) from parsed ``values``; a SettingError names
    the field by its full key (``data.batch_size``)."""
    hints = typing.get_type_hints(schema)
    kwargs = {}
    for field in dataclasses.fields(schema):
        if not field.init or field.name not in values:
            continue
        value = values[field.name]
        if _is_settings(hints[field.name]):
            if not isinstance(value, Namespace):
                names = ", ".join(f.name for f in dataclasses.fields(hints[field.name]))
                raise SettingError(prefix + field.name, f"must be a mapping of {names}, got {value!r}")
            value = instantiate(hints[field.name], value, f"{prefix}{field.name}.")
        kwargs[field.name] = value
    try:
        return schema(**kwargs)
    except SettingError as err:
        raise SettingError(prefix + err.key, err.problem) from None


@dataclass
class Command:
    """A command's parser: its settings dataclass ``schema`` and, optionally, a preset flag
    (``preset_flag`` NAME reads the preset ``preset_kind``/NAME.yaml; ``preset_implies(NAME)``
    gives settings the name stands for, under what the file says)."""

    schema: type
    prog: str
    description: str
    preset_flag: str | None = None
    preset_kind: str | None = None
    preset_help: str = ""
    preset_implies: Callable[[str], dict] | None = None

    def parser(self) -> ArgumentParser:
        parser = ArgumentParser(
            prog=self.prog, description=self.description, exit_on_error=False, formatter_class=HelpFormatter
        )
        parser.add_argument(
            "--config", action=ConfigFile, help="YAML file of settings (--print_config writes one); later flags win"
        )
        if self.preset_flag:
            parser.add_argument(
                self.preset_flag, action=Preset, kind=self.preset_kind, implies=self.preset_implies,
                help=self.preset_help,
            )  # fmt: skip
        parser.add_class_arguments(self.schema, as_positional=True, fail_untyped=True)
        return parser

    def parse(self, argv: Sequence[str] | None = None) -> Any:
        """The checked settings of a command line. ``--help`` and ``--print_config`` print and
        raise SystemExit(0); a bad flag, key or file raises ConfigError."""
        argv = list(sys.argv[1:] if argv is None else argv)
        parser = self.parser()
        try:
            namespace = parser.parse_args(argv)
        except argparse.ArgumentError as err:
            raise ConfigError(explain(str(err), parser, self._sources(argv))) from None
        settings = self.build(namespace, self._sources(argv))
        if hasattr(settings, "check"):
            settings.check()
        return settings

    def from_mapping(self, data: Mapping, source: str = "settings") -> Any:
        """The settings a mapping holds (as a YAML file would), every key and value checked."""
        parser = self.parser()
        try:
            namespace = parser.parse_object(dict(data))
        except argparse.ArgumentError as err:
            raise ConfigError(explain(str(err), parser, file=source)) from None
        return self.build(namespace)

    def build(self, namespace: Namespace, sources: Sequence[tuple[str, str]] = ()) -> Any:
        """The settings dataclass from parsed values; a value out of range names its flag (and
        the file it came from, found in the command line's ``sources``)."""
        try:
            return instantiate(self.schema, namespace)
        except SettingError as err:
            raise ConfigError(f"--{err.key} {err.problem}{origin(err.key, sources)}") from None

    def _sources(self, argv: Sequence[str]) -> list[tuple[str, str]]:
        """The command line's flags and the YAML files it applies (--config FILE, a preset), in
        its order: ("flag", "--name") or ("file", path)."""
        sources = []
        for word, following in zip(argv, [*argv[1:], ""]):
            name, _, inline = word.partition("=")
            value = inline or following
            if name == "--config" and value:
                sources.append(("file", value))
            elif name == self.preset_flag and value:
                try:
                    sources.append(("file", str(find_preset(self.preset_kind, value))))
                except ConfigError:  # an unknown preset: reported by the preset flag itself
                    pass
            elif word.startswith("--"):
                sources.append(("flag", name.removesuffix("+")))
        return sources

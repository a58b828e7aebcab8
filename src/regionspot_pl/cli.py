"""Configuration as data: one dataclass schema per command, its YAML files and its flags.

A command's schema is a dataclass (nested dataclasses for groups, as ``fit``'s ``data``, ``optim``
and ``trainer``); each field is declared with :func:`option`, which holds its default (written only
there), its help text and its checks. From the schema come:

- the flags: one per field, ``--batch-size`` for ``batch_size`` unless the option names another;
- the YAML a command reads (``--config FILE``, or a preset such as ``fit --stage warmup`` for
  ``configs/fit/warmup.yaml``): its keys are the schema's fields, and an unknown key is an error
  that lists the valid ones;
- ``--print-config``: the resolved configuration, as YAML a later ``--config`` reads back.

Precedence: the schema's defaults, then the YAML, then the flags. Every value is checked against
its field's type, choices and minimum before the command runs, and a bad one is a
:class:`ConfigError` naming the flag, the YAML key and the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .errors import RegionSpotError
from .utils.stopping import Stopped, stop_on_signals

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"
T = TypeVar("T")
_UNSET = object()


class ConfigError(RegionSpotError):
    """A flag, a YAML key or a config file is wrong."""


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    flag: str | None = None,
    choices: tuple[Any, ...] | None = None,
    minimum: float | None = None,
) -> Any:
    """A schema field: its default (a list default is copied per instance), help text, flag name
    (default: ``--field-name``), allowed values and smallest allowed number."""
    meta = {"help": help, "flag": flag, "choices": choices, "minimum": minimum}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# --------------------------------------------------------------------------------------------
# YAML files
# --------------------------------------------------------------------------------------------


def find_config(kind: str, name: str) -> Path:
    """``configs/{kind}/{name}.yaml``, looked up in the working directory, then the repository."""
    for root in (Path.cwd() / "configs", REPO_CONFIGS):
        path = root / kind / f"{name}.yaml"
        if path.is_file():
            return path
    available = sorted(p.stem for p in (REPO_CONFIGS / kind).glob("*.yaml"))
    raise ConfigError(f"no config configs/{kind}/{name}.yaml (available: {', '.join(available) or 'none'})")


def load_yaml(path: str | Path) -> dict:
    """A YAML file holding a mapping; a clear error for a missing, invalid or non-mapping file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of settings, got {type(data).__name__}")
    return data


# --------------------------------------------------------------------------------------------
# The schema: fields, types, checks
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One setting of a schema: where it lives (``path``), its flag, type and checks."""

    path: tuple[str, ...]
    flag: str
    type: Any
    field: dataclasses.Field

    @property
    def key(self) -> str:
        return ".".join(self.path)

    def where(self, source: str | None) -> str:
        return f"{self.flag} ({self.key}{' in ' + source if source else ''})"


def _is_schema(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def leaves(schema: type, prefix: tuple[str, ...] = ()) -> Iterator[Leaf]:
    """Every setting of ``schema``, nested groups included, in declaration order."""
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        tp = hints[f.name]
        if _is_schema(tp):
            yield from leaves(tp, (*prefix, f.name))
        else:
            yield Leaf((*prefix, f.name), f.metadata.get("flag") or "--" + f.name.replace("_", "-"), tp, f)


def _union_args(tp: Any) -> tuple[Any, ...]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return typing.get_args(tp)
    return (tp,)


def _type_name(tp: Any) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null"}
    if typing.get_origin(tp) is list:
        return f"a list of {_type_name(typing.get_args(tp)[0]).split(' ', 1)[-1]}s"
    return " or ".join(names.get(t, getattr(t, "__name__", str(t))) for t in _union_args(tp))


def _coerce(value: Any, tp: Any) -> Any:
    """``value`` as type ``tp`` (an int where a float is asked is a float), or _UNSET."""
    for option_tp in _union_args(tp):
        if option_tp is type(None) and value is None:
            return None
        if option_tp is bool and isinstance(value, bool):
            return value
        if option_tp is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option_tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option_tp is str and isinstance(value, str):
            return value
        if typing.get_origin(option_tp) is list and isinstance(value, list):
            items = [_coerce(v, typing.get_args(option_tp)[0]) for v in value]
            if all(v is not _UNSET for v in items):
                return items
    return _UNSET


def check_value(leaf: Leaf, value: Any, source: str | None) -> Any:
    """``value`` checked against the leaf's type, choices and minimum; the coerced value."""
    coerced = _coerce(value, leaf.type)
    if coerced is _UNSET:
        raise ConfigError(f"{leaf.where(source)} must be {_type_name(leaf.type)}, got {value!r}")
    choices, minimum = leaf.field.metadata.get("choices"), leaf.field.metadata.get("minimum")
    for item in coerced if isinstance(coerced, list) else [coerced]:  # a list: each of its items
        if choices is not None and item is not None and item not in choices:
            raise ConfigError(f"{leaf.where(source)} is {item!r}; expected one of: {', '.join(map(str, choices))}")
        if minimum is not None and isinstance(item, (int, float)) and not item >= minimum:
            raise ConfigError(f"{leaf.where(source)} is {item!r}; it must be >= {minimum:g}")
    return coerced


def _check_keys(schema: type, data: dict, source: str, prefix: str = "") -> None:
    """Every key of ``data`` must be a field of ``schema``; groups must be mappings."""
    hints = typing.get_type_hints(schema)
    valid = [f.name for f in dataclasses.fields(schema)]
    for key, value in data.items():
        if key not in valid:
            raise ConfigError(
                f"unknown key {prefix + str(key)!r} in {source}; valid keys{' of ' + prefix[:-1] if prefix else ''}: "
                f"{', '.join(valid)}"
            )
        if _is_schema(hints[key]):
            if not isinstance(value, dict):
                names = ", ".join(f.name for f in dataclasses.fields(hints[key]))
                raise ConfigError(f"{prefix + key} in {source} must be a mapping of {names}, got {value!r}")
            _check_keys(hints[key], value, source, f"{prefix}{key}.")


def build(schema: type[T], values: dict[tuple[str, ...], Any]) -> T:
    """The schema instance from checked values by path (missing ones take their defaults)."""

    def make(cls: type, prefix: tuple[str, ...]) -> Any:
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for f in dataclasses.fields(cls):
            path = (*prefix, f.name)
            if _is_schema(hints[f.name]):
                kwargs[f.name] = make(hints[f.name], path)
            elif path in values:
                kwargs[f.name] = values[path]
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
                raise ConfigError(f"{flag} ({'.'.join(path)}) is required: {f.metadata.get('help', '')}")
        return cls(**kwargs)

    return make(schema, ())


def from_dict(schema: type[T], data: dict, source: str = "config") -> T:
    """A schema instance from a (nested) mapping, as read from YAML; every key and value checked."""
    return build(schema, _values(schema, data, source))


def _values(schema: type, data: dict, source: str) -> dict[tuple[str, ...], Any]:
    """The checked values a mapping gives, by path (fields it leaves out are absent)."""
    _check_keys(schema, data, source)
    values = {}
    for leaf in leaves(schema):
        node: Any = data
        for part in leaf.path:
            node = node.get(part, _UNSET) if isinstance(node, dict) else _UNSET
        if node is not _UNSET:
            values[leaf.path] = check_value(leaf, node, source)
    return values


def to_yaml(config: Any) -> str:
    """A schema instance as YAML that :func:`from_dict` reads back to an equal instance."""
    return yaml.safe_dump(dataclasses.asdict(config), sort_keys=False)


# --------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:  # one `error:` line via run_command, not usage + exit
        raise ConfigError(f"{message} (see {self.prog} --help)")


def _flag_value(tp: Any) -> Callable[[str], Any]:
    """Parses one command-line word for a field of type ``tp`` ('none'/'null' for an optional)."""
    scalars = [t for t in _union_args(tp) if t is not type(None)]

    def parse(text: str) -> Any:
        if type(None) in _union_args(tp) and text.lower() in ("none", "null"):
            return None
        for t in scalars:
            try:
                return t(text) if t in (int, float) else text
            except ValueError:
                continue
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected {_type_name(tp)}")

    return parse


def add_flags(parser: argparse.ArgumentParser, schema: type) -> list[Leaf]:
    """One flag per setting of ``schema``; unset flags are absent from the parsed namespace."""
    found = list(leaves(schema))
    groups: dict[str, Any] = {}  # --help lists each settings group (fit's data, optim, ...) under its name
    for leaf in found:
        meta = leaf.field.metadata
        default = leaf.field.default if leaf.field.default is not dataclasses.MISSING else None
        if leaf.field.default_factory is not dataclasses.MISSING:
            default = leaf.field.default_factory()
        rules = [f"one of {', '.join(map(str, meta['choices']))}"] if meta.get("choices") else []
        rules += [f">= {meta['minimum']:g}"] if meta.get("minimum") is not None else []
        text = f"{meta.get('help', '')} [{'; '.join([leaf.key, *rules, f'default: {default}'])}]"
        text = text.replace("%", "%%")  # argparse formats help with %
        kwargs: dict[str, Any] = {"dest": leaf.key, "help": text, "default": argparse.SUPPRESS}
        args = _union_args(leaf.type)
        if bool in args:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif any(typing.get_origin(a) is list for a in args):
            item = next(typing.get_args(a)[0] for a in args if typing.get_origin(a) is list)
            kwargs.update(nargs="+", type=_flag_value(item), metavar=leaf.path[-1].upper())
        else:
            kwargs.update(type=_flag_value(leaf.type), metavar=leaf.path[-1].upper())
        group = parser
        if len(leaf.path) > 1:
            group = groups.get(leaf.path[0]) or groups.setdefault(leaf.path[0], parser.add_argument_group(leaf.path[0]))
        group.add_argument(leaf.flag, **kwargs)
    return found


@dataclasses.dataclass
class Command:
    """A command's parser and configuration: schema defaults < YAML (``--config`` or the preset
    ``configs/{preset_kind}/NAME.yaml`` chosen by ``preset_flag``) < flags."""

    schema: type
    prog: str
    description: str
    preset_flag: str | None = None
    preset_kind: str | None = None
    preset_help: str = ""
    # settings a preset implies, under what its YAML says (e.g. test: --split S -> out runs/test/S)
    preset_defaults: Callable[[str], dict] | None = None
    # top-level fields also accepted as positional arguments, in this order (e.g. convert SRC DST)
    positionals: tuple[str, ...] = ()

    def parser(self) -> argparse.ArgumentParser:
        p = _Parser(prog=self.prog, description=self.description, formatter_class=argparse.RawDescriptionHelpFormatter)
        if self.preset_flag:
            p.add_argument(self.preset_flag, dest="preset", metavar="NAME", help=self.preset_help)
        p.add_argument("--config", dest="config_file", metavar="FILE", help="a YAML file of this command's settings")
        p.add_argument("--print-config", action="store_true", help="print the resolved settings as YAML and exit")
        add_flags(p, self.schema)
        for name in self.positionals:
            flag = "--" + name.replace("_", "-")
            p.add_argument(name, nargs="?", default=argparse.SUPPRESS, metavar=name.upper(), help=f"= {flag}")
        return p

    def parse(self, argv: list[str] | None = None) -> tuple[Any, bool]:
        """(the checked configuration, whether --print-config was asked)."""
        args = vars(self.parser().parse_args(argv))
        data, source = {}, None
        if args.get("config_file") and args.get("preset"):
            raise ConfigError(f"pass either {self.preset_flag} or --config, not both")
        if args.get("config_file"):
            source = args["config_file"]
        elif args.get("preset"):
            source = str(find_config(self.preset_kind, args["preset"]))
        if source:
            data = load_yaml(source)
        if args.get("preset") and self.preset_defaults:
            data = {**self.preset_defaults(args["preset"]), **data}
        values = _values(self.schema, data, source or "config")
        for leaf in leaves(self.schema):
            if leaf.key in args:
                values[leaf.path] = check_value(leaf, args[leaf.key], None)
        config = build(self.schema, values)
        printing = bool(args.get("print_config"))
        if hasattr(config, "check") and not printing:  # printing shows the settings, complete or not
            config.check()
        return config, printing


def getattr_path(obj: Any, path: tuple[str, ...]) -> Any:
    for part in path:
        obj = getattr(obj, part)
    return obj


def run_command(
    command: Command, argv: list[str] | None, run: Callable[[Any], int], stop_hint: str = "", signals: bool = True
) -> int:
    """A command's ``main``: parse and check its settings, then ``run`` them.

    A :class:`RegionSpotError` becomes one ``error: ...`` line on stderr and exit code 2;
    SIGTERM/SIGINT (within ``signals``) exit with 128 + the signal number after ``stop_hint``.
    """
    try:
        config, print_only = command.parse(argv)
        if print_only:
            print(to_yaml(config), end="")
            return 0
        if not signals:
            return run(config)
        with stop_on_signals():
            return run(config)
    except Stopped as stop:
        print(f"{stop}{': ' + stop_hint if stop_hint else ''}", file=sys.stderr)
        return stop.exit_code
    except RegionSpotError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def check_fields(config: Any, error: type[RegionSpotError] = ConfigError) -> None:
    """Every field of a (flat) schema instance against its type, choices and minimum: the same
    checks for an instance made in Python (a notebook, a test) as for one read from YAML or flags."""
    for leaf in leaves(type(config)):
        try:
            check_value(leaf, getattr_path(config, leaf.path), None)
        except ConfigError as err:
            raise error(str(err)) from None

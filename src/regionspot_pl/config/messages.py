"""jsonargparse's error messages as one line that names the flag (or the file and key) and the fix."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from ..errors import RegionSpotError

# jsonargparse's spelling of a type in "Expected a <T>. Got value: V" -> ours
_TYPE_NAMES = {
    "<class 'int'>": "an integer",
    "<class 'float'>": "a number",
    "<class 'str'>": "a string",
    "<class 'bool'>": "true or false",
    "<class 'NoneType'>": "null",
    "<class 'list'>": "a list such as [a,b]",
}


class ConfigError(RegionSpotError):
    """A flag, a YAML key or a config file is wrong."""


def _type_name(spelled: str) -> str:
    literal = re.fullmatch(r"typing\.Literal\[(.*)\]", spelled)
    if literal:
        return "one of " + ", ".join(v.strip().strip("'\"") for v in literal.group(1).split(","))
    return _TYPE_NAMES.get(spelled, spelled)


def _expected(detail: str) -> str:
    """jsonargparse's 'Expected a <class 'int'>. Got value: many' (one line per member of a
    union) -> 'must be an integer, got many'; any other detail with its whitespace collapsed."""
    types = re.findall(r"Expected a (<class '[^']+'>|typing\.Literal\[[^\]]*\])", detail)
    value = re.search(r"(?:Got|Given) value: (.*)", detail)
    if not types or not value:
        return " ".join(detail.split())
    names = dict.fromkeys(_type_name(spelled) for spelled in types)
    return f"must be {' or '.join(names)}, got {value.group(1).strip()}"


def _settings_keys(parser: Any, group: str | None = None) -> list[str]:
    """The keys a config file (or one group of it) may hold."""
    defaults = parser.get_defaults()
    node = defaults[group] if group else defaults
    return [key for key in vars(node) if key != "config"]


def _sets(file: str, key: str) -> bool:
    """Whether the YAML file ``file`` sets the dotted ``key``."""
    try:
        node: Any = yaml.safe_load(Path(file).read_text())
    except (OSError, yaml.YAMLError):  # not read (the error being reported may be that)
        return False
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def source_file(key: str, sources: Sequence[tuple[str, str]]) -> str | None:
    """The YAML file the value of ``key`` came from, None when it came from a flag or a default.
    ``sources``: the command line's ("flag", "--name") and ("file", path) in its order; the
    last one that sets ``key`` is the one whose value stands."""
    for kind, value in reversed(sources):
        if kind == "flag" and value == f"--{key}":
            return None
        if kind == "file" and _sets(value, key):
            return value
    return None


def origin(key: str, sources: Sequence[tuple[str, str]]) -> str:
    """' (KEY in FILE)' when the value of ``key`` came from a YAML file, else ''."""
    file = source_file(key, sources)
    return f" ({key} in {file})" if file else ""


def explain(message: str, parser: Any, sources: Sequence[tuple[str, str]] = (), file: str = "") -> str:
    """One line for a jsonargparse error ``message``. ``sources`` (see :func:`source_file`) tell
    where a bad value came from; ``file``: the file being read when the error arose."""
    where = f" in {file}" if file else ""
    key = re.match(r'Parser key "([^"]+)":\s*(.*)', message, re.S)
    if key:
        name, detail = key.groups()
        source = f" ({name}{where})" if file else origin(name, sources)
        return f"--{name} {_expected(detail)}{source or f' (see {parser.prog} --help)'}"
    unknown = re.match(r"Option '([^']+)' is not accepted", message)
    if unknown:
        name, valid = unknown.group(1), ", ".join(_settings_keys(parser))
        return f"unknown key {name!r} in {file or source_file(name, sources)}; valid keys: {valid}"
    unknown = re.match(r"Group '([^']+)' does not accept option '([^']+)'", message)
    if unknown:
        group, option = unknown.groups()
        name, valid = f"{group}.{option}", ", ".join(_settings_keys(parser, group))
        return f"unknown key {name!r} in {file or source_file(name, sources)}; valid keys of {group}: {valid}"
    if message.startswith("Unexpected config"):
        return f"{file} must hold a mapping of settings (key: value lines), not {' '.join(message.split()[2:])}"
    if message.startswith("Problems parsing config"):
        return f"{file} is not valid YAML: {' '.join(message.split(':', 1)[1].split())}"
    return f"{file + ': ' if file else ''}{' '.join(message.split())} (see {parser.prog} --help)"

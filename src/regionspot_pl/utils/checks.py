"""The checks every settings dataclass runs on itself, whoever made it (flags, YAML, Python).

A field's range is part of its type: ``batch_size: Annotated[int, Range(1)] = 2``. The command
line shows it in ``--help`` (``type: Annotated[int, >= 1]``) and checks the type; the dataclass's
``__post_init__`` calls :func:`check_settings`, which checks the range and the ``Literal``
choices, so a setting made in a notebook is refused as one read from a flag. A failure is a
:class:`SettingError` carrying the field's name, which a command turns into its flag.

A settings module leaves out ``from __future__ import annotations``: jsonargparse reads postponed
hints without their ``Annotated`` extras, and ``--help`` would not show the ranges (they would
still be checked).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any

from ..errors import RegionSpotError


class SettingError(RegionSpotError, ValueError):
    """A setting of the wrong type or out of its range.

    ``key`` names the field (``batch_size``), so that a command can name its flag
    (``--data.batch_size``); ``problem`` is the rest of the message.
    """

    def __init__(self, key: str, problem: str) -> None:
        self.key, self.problem = key, problem
        super().__init__(f"{key} {problem}")


@dataclass(frozen=True)
class Range:
    """The interval a number must lie in (ends included; None: unbounded)."""

    min: float | None = None
    max: float | None = None

    def __repr__(self) -> str:  # how --help shows the type: Annotated[int, >= 1]
        if self.min is None and self.max is None:
            return "any"
        if self.max is None:
            return f">= {self.min:g}"
        if self.min is None:
            return f"<= {self.max:g}"
        return f"in [{self.min:g}, {self.max:g}]"

    def holds(self, value: float) -> bool:
        return (self.min is None or value >= self.min) and (self.max is None or value <= self.max)


def _options(hint: Any) -> tuple[Any, ...]:
    """The members of a union (``int | None``), else the hint alone."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _problem(value: Any, hint: Any) -> str | None:
    """What is wrong with ``value`` for the type ``hint`` (None: nothing, or not checked here)."""
    problems = []
    for option in _options(hint):
        if option is type(None):
            if value is None:
                return None
            continue
        origin = typing.get_origin(option)
        if origin is typing.Annotated:
            base, *marks = typing.get_args(option)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (base is int and type(value) is float):
                problems.append(f"must be {base.__name__}, got {value!r}")
                continue
            bounds = next((m for m in marks if isinstance(m, Range)), Range())
            if not math.isfinite(value):
                problems.append(f"is {value!r}; it must be a finite number")
            elif not bounds.holds(value):
                problems.append(f"is {value!r}; it must be {bounds!r}")
            else:
                return None
        elif origin is typing.Literal:
            if value in typing.get_args(option):
                return None
            problems.append(f"is {value!r}; expected one of: {', '.join(map(str, typing.get_args(option)))}")
        elif origin is list and isinstance(value, list):
            found = [p for p in (_problem(v, typing.get_args(option)[0]) for v in value) if p]
            if not found:
                return None
            problems.append(f"item {found[0]}")
        else:
            return None  # a type these checks leave to the command line (str, bool, ...)
    return problems[0] if problems else None


def check_settings(settings: Any, error: type[SettingError] = SettingError) -> None:
    """Each field of the dataclass ``settings`` against its ``Range`` and ``Literal`` choices
    (inside ``X | None`` and ``list[X]`` too); raises ``error`` naming the first bad field."""
    hints = typing.get_type_hints(type(settings), include_extras=True)
    for field in dataclasses.fields(settings):
        problem = _problem(getattr(settings, field.name), hints[field.name])
        if problem:
            raise error(field.name, problem)

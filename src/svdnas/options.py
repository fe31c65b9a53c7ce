"""Config dataclasses that carry their own command-line options and round-trip through JSON.

A field declared with :func:`option` holds, beside its one default, the flag, help text and choices
the command line shows for it (``svdnas.cli`` builds its argparse options from them); a field
declared with a plain default is a setting the command line does not offer but a ``--config`` file
may still give. :class:`Config` gives every such dataclass ``to_dict``/``from_dict``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

from svdnas.errors import SpecError


def option(
    default: Any = dataclasses.MISSING,
    *,
    flag: str,
    help: str = "",
    choices: Sequence[Any] | None = None,
    parse: Callable[[Any], Any] | None = None,
    metavar: str | None = None,
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field that is also a command-line option.

    Args:
        flag: the option's name on the command line (``--search-images``); a ``--no-X`` flag of a
            bool field sets it to False.
        help: what the option does; the default is appended when the text does not mention one.
        choices: the values allowed (the same object the validation checks against).
        parse: turns the command line's (or a --config file's) value into the field's, for fields
            whose text form differs (``--grid START:STOP[:STEP]``).
    """
    metadata = {"flag": flag, "help": help, "choices": tuple(choices) if choices is not None else None,
                "parse": parse, "metavar": metavar}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


def flag_of(cls: type, name: str) -> str:
    """The command-line flag of field ``name`` of ``cls`` (or the field's name when it has none)."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.metadata.get("flag", name)
    raise KeyError(name)


def field_types(cls: type) -> dict[str, Any]:
    """Each field's type, with ``X | None`` read as ``X``."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            hint = args[0] if len(args) == 1 else hint
        out[f.name] = hint
    return out


def coerce(value: Any, hint: Any, where: str) -> Any:
    """``value`` (from JSON, YAML or the command line) as a field of type ``hint`` wants it."""
    if value is None:
        return None
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise SpecError(f"{where} must be a mapping of {hint.__name__}'s settings, got {value!r}")
        return hint.from_dict(value)
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, (list, tuple)):
            raise SpecError(f"{where} must be a list, got {value!r}")
        return tuple(coerce(v, a, where) for v, a in zip(value, typing.get_args(hint)))
    if hint is bool:
        if not isinstance(value, bool):
            raise SpecError(f"{where} must be true or false, got {value!r}")
        return value
    if hint in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float, str)) or (hint is int and isinstance(value, float) and not value.is_integer()):
            raise SpecError(f"{where} must be {'an integer' if hint is int else 'a number'}, got {value!r}")
        try:
            return hint(value)
        except ValueError:
            raise SpecError(f"{where}: invalid {hint.__name__} value: {value!r}") from None
    if hint is str and not isinstance(value, str):
        raise SpecError(f"{where} must be a string, got {value!r}")
    return value


class Config:
    """``to_dict``/``from_dict`` for a config dataclass (nested configs as nested dicts, tuples as lists)."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, Config):
                value = value.to_dict()
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        """The config ``values`` (as ``to_dict`` writes them) describe; an unknown key is an error."""
        types_ = field_types(cls)
        unknown = sorted(set(values) - set(types_))
        if unknown:
            raise SpecError(f"unknown {cls.__name__} setting(s): {', '.join(unknown)}")
        return cls(**{k: coerce(v, types_[k], flag_of(cls, k)) for k, v in values.items()})  # type: ignore[call-arg]

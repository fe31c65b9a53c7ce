"""Argparse options made from the config dataclasses' fields, and the configs built back from them.

A field declared with :func:`svdnas.options.option` becomes one option: its flag, help, choices and
type come from the field, its default (shown in the help) from the dataclass. The option's own
argparse default is ``SUPPRESS``, so the namespace holds exactly what the command line (or a
``--config`` file, see :mod:`svdnas.cli.common`) gave; everything else keeps the dataclass default.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from svdnas.options import coerce, field_types


@dataclass(frozen=True)
class Section:
    """The options one config dataclass gives a command.

    Attributes:
        cls: the config dataclass.
        key: the field of the command's main config that holds it (``search``), or None for the
            main config itself.
        defaults: values that replace the dataclass's defaults here (the main config's
            ``default_factory`` makes ``synth.num`` 1384 for compress).
        flags: field name -> flag, where this command names an option otherwise.
        only: the fields to offer (None: every field that has a flag).
        required: fields the command needs (no default shown in the help).
    """

    cls: type
    key: str | None = None
    defaults: dict[str, Any] = field(default_factory=dict)
    flags: dict[str, str] = field(default_factory=dict)
    only: tuple[str, ...] | None = None
    required: tuple[str, ...] = ()

    def fields(self) -> list[dataclasses.Field]:
        return [f for f in dataclasses.fields(self.cls)
                if "flag" in f.metadata and (self.only is None or f.name in self.only)]

    def flag(self, f: dataclasses.Field) -> str:
        return self.flags.get(f.name, f.metadata["flag"])

    def default(self, f: dataclasses.Field) -> Any:
        if f.name in self.defaults:
            return self.defaults[f.name]
        if f.default is not dataclasses.MISSING:
            return f.default
        return f.default_factory()  # type: ignore[misc]


def dest_of(flag: str) -> str:
    """The namespace attribute (and --config key) of a flag: ``--search-images`` -> ``search_images``."""
    return flag.lstrip("-").replace("-", "_")


def _help(text: str, default: Any, required: bool) -> str:
    if required or default is None or "default" in text:
        return text
    shown = ":".join(str(x) for x in default) if isinstance(default, tuple) else default
    return f"{text} (default: {shown})" if text else f"default: {shown}"


def add_section(parser: argparse.ArgumentParser, section: Section) -> None:
    """Add an option to ``parser`` for every field of ``section`` that has a flag."""
    types = field_types(section.cls)
    for f in section.fields():
        flag, hint, meta = section.flag(f), types[f.name], f.metadata
        default = section.default(f)
        kw: dict[str, Any] = {"dest": dest_of(flag), "default": argparse.SUPPRESS,
                              "help": _help(meta["help"], None if flag.startswith("--no-") else default, f.name in section.required)}
        if hint is bool:
            kw["action"] = "store_true"
        else:
            if meta["parse"] is None and hint in (int, float):
                kw["type"] = hint
            if meta["choices"] is not None:
                kw["choices"] = meta["choices"]
            if meta["metavar"]:
                kw["metavar"] = meta["metavar"]
        parser.add_argument(flag, **kw)


def section_values(section: Section, args: argparse.Namespace, nested: dict[str, Any] | None = None) -> dict[str, Any]:
    """The settings of ``section`` that were given: a ``--config`` file's nested mapping, then the options.

    Values come back as the fields want them (parsed, coerced); what was not given is absent.
    """
    types = field_types(section.cls)
    out: dict[str, Any] = dict(nested or {})
    for f in section.fields():
        flag = section.flag(f)
        dest = dest_of(flag)
        if not hasattr(args, dest):
            continue
        value = getattr(args, dest)
        if flag.startswith("--no-"):
            if value:
                out[f.name] = False
            continue
        if f.metadata["parse"] is not None:
            value = f.metadata["parse"](value)
        out[f.name] = coerce(value, types[f.name], flag)
    return out


def build(section: Section, args: argparse.Namespace, nested: dict[str, Any] | None = None, **fixed: Any) -> Any:
    """The config of ``section``: its defaults, then what was given, then ``fixed`` (validated by the dataclass)."""
    values = {**section.defaults, **section_values(section, args, nested), **fixed}
    return section.cls.from_dict(values)


def section_dests(sections: list[Section]) -> dict[str, str]:
    """dest -> flag of every option the sections add."""
    return {dest_of(s.flag(f)): s.flag(f) for s in sections for f in s.fields()}

"""Command-line flags built from the settings dataclasses: one source of names, defaults and help.

``add_arguments(parser, cls)`` adds one flag per field of a frozen config dataclass
whose metadata has a ``group`` (``EngineConfig``, ``ServerConfig``); flags default to
None so that ``config_from_args`` can tell "not given" (the dataclass default, or a
subcommand's own default) from a value the user typed.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing

_GROUP_TITLES = {"model": "model", "memory": "memory", "scheduling": "scheduling", "kernels": "kernels",
                 "parallelism": "parallelism", "server": "server"}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse_type(cls, f: dataclasses.Field):
    hint = typing.get_type_hints(cls)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    return args[0]


def add_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """Add a flag for every CLI field of ``cls``, in argument groups named by the field's ``group``."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(cls):
        group = f.metadata.get("group")
        if not group:
            continue
        g = groups.get(group) or groups.setdefault(group, parser.add_argument_group(_GROUP_TITLES.get(group, group)))
        typ = _parse_type(cls, f)
        names = (_flag(f.name), *f.metadata.get("flags", ()))
        default = f.default if f.default is not dataclasses.MISSING else None
        help_ = f"{f.metadata['help']} (default: {default})"
        if typ is bool:
            g.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_)
        else:
            g.add_argument(*names, dest=f.name, type=typ, default=None, choices=f.metadata.get("choices"),
                           help=help_)


def config_from_args(cls, args: argparse.Namespace, **defaults):
    """Build ``cls`` from the flags the user gave; ``defaults`` replace the dataclass defaults
    for flags the user did not give (e.g. ``ferry generate`` uses one batch slot)."""
    kw = dict(defaults)
    for f in dataclasses.fields(cls):
        v = getattr(args, f.name, None)
        if v is not None:
            kw[f.name] = v
    return cls(**kw)

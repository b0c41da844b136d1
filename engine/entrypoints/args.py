"""Command-line flags built from the settings dataclasses: one source of names, defaults and help.

``add_arguments(parser, cls)`` adds one flag per field of a frozen config dataclass
whose metadata has a ``group`` (``EngineConfig``, ``ServerConfig``); flags default to
None so that ``config_from_args`` can tell "not given" (the dataclass default, or a
subcommand's own default) from a value the user typed.

A field's ``flags`` metadata holds its other spellings, vLLM's among them
(``--max-num-seqs`` for ``max_batch``); ``canonical_kwargs`` maps the same spellings as
Python keywords (``max_num_seqs=8``) for ``LLM(...)``, so both come from one table.
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
        help_ = f.metadata["help"]
        if "default" not in help_:                   # the help may say it better ("default: the model's")
            help_ = f"{help_} (default: {default})"
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


def keyword_aliases(cls) -> dict[str, str]:
    """Keyword spelling of every long extra flag -> field name (``{"max_num_seqs": "max_batch", ...}``)."""
    out = {}
    for f in dataclasses.fields(cls):
        for flag in f.metadata.get("flags", ()):
            if flag.startswith("--"):
                out[flag[2:].replace("-", "_")] = f.name
    return out


def canonical_kwargs(cls, kwargs: dict) -> dict:
    """``kwargs`` with alias names (vLLM's ``tensor_parallel_size``, ``max_num_seqs``, ...) replaced by
    ``cls``'s field names; ValueError if a setting is given under two names."""
    aliases = keyword_aliases(cls)
    out: dict = {}
    given_as: dict[str, str] = {}
    for key, value in kwargs.items():
        name = aliases.get(key, key)
        if name in out:
            raise ValueError(f"{name} given twice: as {given_as[name]!r} and as {key!r}")
        out[name], given_as[name] = value, key
    return out

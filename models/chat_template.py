"""Chat templates rendered with Jinja2, with the semantics of transformers' ``apply_chat_template``.

Same environment: sandboxed, ``trim_blocks`` and ``lstrip_blocks``, the
``loopcontrols`` extension, ``raise_exception(msg)``, ``strftime_now(fmt)``,
a ``tojson`` filter that keeps non-ASCII text, and the variables
``messages``, ``add_generation_prompt``, ``bos_token``, ``eos_token`` plus any
extra keyword arguments (``tools``, ``documents``, ...).
"""
from __future__ import annotations

import datetime
import functools
import json

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment


class TemplateError(ValueError):
    """The template raised (``raise_exception``) or failed to render."""


def _raise(message):
    raise TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(template)


def validate_messages(messages) -> list[dict]:
    """A conversation is a non-empty list of {"role": str, "content": str | list | None, ...} dicts."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ValueError(f"messages[{i}] must be a dict with a string 'role'")
        if "content" in m and not isinstance(m["content"], (str, list, type(None))):
            raise ValueError(f"messages[{i}]['content'] must be a string, a list of parts, or null")
    return list(messages)


def render(template: str, messages, add_generation_prompt: bool = True, bos_token: str = "",
           eos_token: str = "", **kwargs) -> str:
    """Render ``template`` for ``messages``; errors become ``ValueError`` with the reason."""
    messages = validate_messages(messages)
    try:
        return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=bos_token, eos_token=eos_token, **kwargs)
    except TemplateError:
        raise
    except jinja2.TemplateError as e:
        raise ValueError(f"chat template failed: {e}") from e

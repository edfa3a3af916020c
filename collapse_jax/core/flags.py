"""Config flags, generated from the frozen study configs: one ``--field-name`` flag per field,
typed from its annotation, documented by the field's comment, and applied onto a base config
(defaults or an experiment file) only when given."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import io
import json
import re
import tokenize
import typing
from collections.abc import Callable
from typing import Any

from collapse_jax.core.errors import ConfigError


@functools.cache
def field_comments(config_cls) -> dict[str, str]:
    """Each field's comment in the class source (the comment that follows its definition),
    including the fields a config inherits from dataclass bases (e.g. the operator fields)."""
    comments: dict[str, str] = {}
    for cls in reversed(config_cls.__mro__):
        if cls is not config_cls and dataclasses.is_dataclass(cls):
            comments.update(field_comments(cls))
    comments.update(_own_comments(config_cls))
    return comments


def _own_comments(config_cls) -> dict[str, str]:
    try:
        source = inspect.getsource(config_cls)
    except (OSError, TypeError):
        return {}
    names = {f.name for f in dataclasses.fields(config_cls)}
    comments: dict[str, str] = {}
    current = None
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    line_start = True
    for tok in tokens:
        if tok.type in (tokenize.NEWLINE, tokenize.NL):
            line_start = True
            continue
        if tok.type in (tokenize.INDENT, tokenize.DEDENT):
            continue
        if line_start and tok.type == tokenize.NAME and tok.string in names:
            current = tok.string
        elif tok.type == tokenize.COMMENT and current and current not in comments:
            comments[current] = tok.string.lstrip("#").strip()
        line_start = False
    return comments


#: Arguments that are values, not options, although they start with "-": negative numbers in
#: any spelling (``-inf``, ``-1e-3``, ``-.5``) and comma-separated lists (``-0.5,1.5``).
_NEGATIVE_VALUE = re.compile(r"-(inf|infinity|nan|\.?\d)[\w.,:+-]*", re.IGNORECASE)


class _FieldHelp:
    """A config flag's help text, read from the field's comment only when help is printed:
    finding a class's source parses its whole module (0.16 s for the discrete study's config,
    on every run), and only ``--help`` shows the text."""

    def __init__(self, config_cls, name: str):
        self.config_cls, self.name = config_cls, name

    def text(self) -> str:
        # argparse formats help with %
        return field_comments(self.config_cls).get(self.name, "").replace("%", "%%")


class Parser(argparse.ArgumentParser):
    """``argparse`` with one-line errors: ``PROG: error: MESSAGE`` and exit code 2, no usage
    block (``--help`` still prints it). A negative value (``--fresh-fraction -inf``,
    ``--p0 -0.5,1.5``) is taken as the flag's value, so that validation can name it. Config
    flags' help texts are read when help is formatted."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")

    def format_help(self) -> str:
        for action in self._actions:
            if isinstance(action.help, _FieldHelp):
                action.help = action.help.text()
        return super().format_help()

    def _parse_optional(self, arg_string):
        if _NEGATIVE_VALUE.fullmatch(arg_string):
            return None
        return super()._parse_optional(arg_string)


def _sequence(text: str):
    """A tuple flag: JSON (``[[0, 0], [3, 0]]``) or comma-separated numbers (``0,50,200``)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        try:
            value = [json.loads(v) for v in text.split(",")] if text.strip() else []
        except json.JSONDecodeError:
            raise argparse.ArgumentTypeError(
                f"expected JSON or comma-separated numbers, got {text!r}"
            ) from None
    if not isinstance(value, list):
        value = [value]
    return as_tuple(value)


def as_tuple(v):
    """Nested lists (JSON, TOML) as nested tuples, so configs stay hashable."""
    if isinstance(v, list | tuple):
        return tuple(as_tuple(x) for x in v)
    return v


def add_config_arguments(
    parser: argparse.ArgumentParser, config_cls, aliases: dict[str, tuple[str, ...]] | None = None
) -> None:
    """One flag per field of ``config_cls`` (booleans get ``--x/--no-x``; tuples take JSON or
    comma-separated numbers), plus the ``aliases`` given per field; unset flags are None and
    leave the base config unchanged."""
    aliases = aliases or {}
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        flags = ["--" + f.name.replace("_", "-"), *aliases.get(f.name, ())]
        typ = hints[f.name]
        origin = typing.get_origin(typ) or typ
        help_ = _FieldHelp(config_cls, f.name)
        if not isinstance(parser, Parser):  # a plain argparse parser formats help its own way
            help_ = help_.text()
        kw: dict[str, Any] = {"dest": f.name, "default": None, "help": help_}
        if typ is bool:
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, **kw)
        elif origin is tuple:
            parser.add_argument(*flags, type=_sequence, **kw)
        elif typ in (int, float, str):
            parser.add_argument(*flags, type=typ, **kw)
        else:
            raise TypeError(f"{config_cls.__name__}.{f.name}: no flag for type {typ!r}")


def flag_updates(args: argparse.Namespace, config_cls) -> dict[str, Any]:
    """The config fields whose flags were given (flags default to None when unset)."""
    return {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(config_cls)
        if getattr(args, f.name, None) is not None
    }


def apply_flags(args: argparse.Namespace, base, validate: Callable):
    """Apply the flags that were given onto ``base`` and validate the result."""
    return validate(dataclasses.replace(base, **flag_updates(args, type(base))))


def config_with(base, settings: dict[str, Any], where: str):
    """``base`` (a frozen config) with ``settings`` applied; a setting that is not a field is
    refused with a ConfigError naming it, ``where`` it came from and the fields there are."""
    fields = {f.name for f in dataclasses.fields(base)}
    unknown = sorted(set(settings) - fields)
    if unknown:
        raise ConfigError(
            f"{where}: unknown config key(s) {', '.join(unknown)}; use {', '.join(sorted(fields))}"
        )
    return dataclasses.replace(base, **settings)

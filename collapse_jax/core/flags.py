"""Config flags: apply the command-line flags that were given onto a frozen study config."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from typing import Any


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

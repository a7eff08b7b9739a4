"""Command-line flags generated from config dataclasses, so every default lives in one place."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, get_type_hints


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, *,
                            exclude: tuple[str, ...] = ()) -> None:
    """One ``--name`` flag per field of ``cls`` with its type, default and ``metadata['help']``.

    Boolean fields become ``--name`` / ``--no-name`` switches.
    """
    hints = get_type_hints(cls)
    group = parser.add_argument_group(cls.__name__)
    for f in dataclasses.fields(cls):
        if f.name in exclude or not f.init:
            continue
        kind = hints[f.name]
        help_text = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else None
        choices = f.metadata.get("choices")
        if kind is bool:
            group.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction,
                               default=default, help=help_text)
        else:
            scalar = kind if kind in (int, float, str) else str
            group.add_argument(f"--{f.name}", type=scalar, default=default, choices=choices,
                               required=f.default is dataclasses.MISSING, help=help_text)


def dataclass_from_args(cls: type, args: argparse.Namespace, **overrides: Any):
    """Build ``cls`` from the parsed flags that match its fields (plus ``overrides``)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
              if f.init and hasattr(args, f.name)}
    values.update(overrides)
    return cls(**values)

"""Command-line flags generated from config dataclasses, so every default lives in one place."""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any, get_type_hints

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, *,
                            exclude: tuple[str, ...] = (), dashes: bool = False,
                            env_prefix: str | None = None) -> None:
    """One ``--name`` flag per field of ``cls`` with its type, default and ``metadata['help']``.

    Boolean fields become ``--name`` / ``--no-name`` switches. With ``dashes`` the flag is spelled
    ``--max-sessions`` (the attribute stays ``max_sessions``). With ``env_prefix`` every flag has an
    environment-variable twin (``FM_MAX_SESSIONS``) whose value replaces the default.
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
        flag = "--" + (f.name.replace("_", "-") if dashes else f.name)
        scalar = kind if kind in (int, float, str, bool) else str
        if env_prefix:
            env = env_prefix + f.name.upper()
            help_text = f"{help_text} [env {env}]"
            if env in os.environ:
                default = _from_env(env, os.environ[env], scalar, choices, parser)
        if kind is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                               default=default, help=help_text)
        else:
            group.add_argument(flag, dest=f.name, type=scalar, default=default, choices=choices,
                               required=default is None and f.default is dataclasses.MISSING,
                               help=help_text)


def _from_env(name: str, text: str, kind: type, choices, parser: argparse.ArgumentParser) -> Any:
    try:
        if kind is bool:
            if text.lower() not in TRUE_WORDS + FALSE_WORDS:
                raise ValueError(f"expected one of {TRUE_WORDS + FALSE_WORDS}")
            value: Any = text.lower() in TRUE_WORDS
        else:
            value = kind(text)
    except ValueError as exc:
        parser.error(f"environment variable {name}={text!r}: {exc}")
    if choices and value not in choices:
        parser.error(f"environment variable {name}={text!r}: choose from {', '.join(map(str, choices))}")
    return value


def dataclass_from_args(cls: type, args: argparse.Namespace, **overrides: Any):
    """Build ``cls`` from the parsed flags that match its fields (plus ``overrides``)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
              if f.init and hasattr(args, f.name)}
    values.update(overrides)
    return cls(**values)

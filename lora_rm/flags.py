"""Command-line flags generated from TrainConfig's fields: their types, choices and help are written once."""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Iterable
from typing import Any

from lora_rm.config import TrainConfig, config_fields


def flag_type(f: Any) -> tuple[Any, dict[str, Any]]:
    hint = typing.get_type_hints(TrainConfig)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = args[0]
    if hint is bool:
        return None, {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(hint) is list:
        return str, {"nargs": "+"}
    return hint, {}


def add_config_flags(
    parser: argparse.ArgumentParser, names: Iterable[str] | None = None, field_defaults: bool = False
) -> None:
    """Add `--field-name` for every TrainConfig field (or those in `names`) with its type, choices and help.

    Defaults are None, so a --config file can fill what the command line leaves out; with `field_defaults`
    the field's own default is the flag's default (commands that read no config file).
    """
    wanted = None if names is None else set(names)
    for f in config_fields():
        if wanted is not None and f.name not in wanted:
            continue
        kind, extra = flag_type(f)
        default = f.default if f.default is not None else "model/data dependent"
        help_text = f"{f.metadata['help']} (default: {default})"
        if kind is not None:
            extra["type"] = kind
        extra |= {k: f.metadata[k] for k in ("choices", "nargs", "const") if k in f.metadata}
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            default=f.default if field_defaults else None,
            help=help_text,
            **extra,
        )

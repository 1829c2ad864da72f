"""Command-line flags generated from TrainConfig's fields: their types, choices and help are written once; the
parser every lora-rm command uses (no abbreviations, underscore spellings, `--verbose`)."""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Iterable
from typing import Any

from lora_rm.config import TrainConfig, config_fields
from lora_rm.config_file import ALIASES, FLAG_ALIASES
from lora_rm.trl_names import TRL_NAMES


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


class _HelpFormatter(argparse.HelpFormatter):
    """Lists each flag once (its dash spelling) plus its TRL / Trainer alias, not every underscore twin."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        strings = action.option_strings
        if len(strings) > 1:

            def twin(o: str) -> str:
                return "--" + o[2:].replace("_", "-") if "_" in o else "--" + o[2:].replace("-", "_")

            first = strings[0]
            shown = [first] + [
                o
                for o in strings[1:]
                if o != twin(first) and not ("_" not in o and twin(o) in strings and twin(o) != o)
            ]
            shown_action = argparse.Action(shown, action.dest, action.nargs, help=action.help)
            shown_action.metavar, shown_action.choices = action.metavar, action.choices
            action = shown_action
        return super()._format_action_invocation(action)


class Parser(argparse.ArgumentParser):
    """argparse as lora-rm uses it: no abbreviations (`--lr` is not `--lr-scheduler`), every `--long-flag`
    also answers to `--long_flag` (the spelling of TRL and transformers' HfArgumentParser), and `--verbose`."""

    def __init__(self, **kwargs: Any):
        super().__init__(allow_abbrev=False, formatter_class=_HelpFormatter, **kwargs)
        self.add_argument(
            "--verbose",
            action="store_true",
            help="also show third-party warnings, load reports and progress bars",
        )

    def add_argument(self, *names: Any, **kwargs: Any) -> argparse.Action:
        twins = [
            "--" + n[2:].replace("-", "_")
            for n in names
            if isinstance(n, str) and n.startswith("--") and "-" in n[2:]
        ]
        return super().add_argument(*names, *[t for t in twins if t not in names], **kwargs)


def flag_type(f: Any) -> tuple[Any, dict[str, Any]]:
    hint = typing.get_type_hints(TrainConfig)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = args[0]
    if hint is bool:  # `--merge`, `--merge true` (HfArgumentParser style); `--no-merge`
        return parse_bool, {"nargs": "?", "const": True, "metavar": "BOOL"}
    if typing.get_origin(hint) is list:
        return str, {"nargs": "+", "metavar": "NAME"}
    return hint, {}


def or_auto(kind: Any) -> Any:
    """An argparse type that also takes `auto` (any case): TrainConfig then chooses the value."""

    def parse(text: str) -> Any:
        return "auto" if text.strip().lower() == "auto" else kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its "invalid float value" message
    return parse


def add_config_flags(
    parser: argparse.ArgumentParser, names: Iterable[str] | None = None, field_defaults: bool = False
) -> None:
    """Add `--field-name` for every TrainConfig field (or those in `names`) with its type, choices and help,
    and the TRL / TrainingArguments names of `ALIASES` (and, for all fields, `FLAG_ALIASES`).

    Defaults are None, so a --config file can fill what the command line leaves out; with `field_defaults`
    the field's own default is the flag's default (commands that read no config file).
    """
    wanted = None if names is None else set(names)
    aliases: dict[str, list[str]] = {}
    for alias, name in ALIASES.items():
        aliases.setdefault(name, []).append("--" + alias.replace("_", "-"))
    for f in config_fields():
        if wanted is not None and f.name not in wanted:
            continue
        kind, extra = flag_type(f)
        help_text = f.metadata["help"].replace("%", "%%")  # argparse formats help with %
        if f.default is not None:
            default = (
                {True: "on", False: "off"}.get(f.default, f.default)
                if isinstance(f.default, bool)
                else f.default
            )
            help_text += f" (default: {default})"
        extra |= {"type": or_auto(kind) if f.metadata.get("auto") else kind}
        extra |= {k: f.metadata[k] for k in ("choices", "nargs", "const", "metavar") if k in f.metadata}
        flag = "--" + f.name.replace("_", "-")
        default = f.default if field_defaults else None
        parser.add_argument(
            flag, *aliases.get(f.name, []), dest=f.name, default=default, help=help_text, **extra
        )
        if kind is parse_bool:
            parser.add_argument(
                "--no-" + flag[2:], dest=f.name, action="store_false", default=default, help=argparse.SUPPRESS
            )
    if wanted is not None:
        return
    for alias, (name, value) in FLAG_ALIASES.items():
        parser.add_argument(
            "--" + alias,
            dest=f"alias_{alias}",
            type=parse_bool,
            nargs="?",
            const=True,
            default=None,
            metavar="BOOL",
            help=f"same as --{name.replace('_', '-')} {value} (TrainingArguments' name)",
        )
    for name, (switch, help_text) in TRL_NAMES.items():
        kwargs = {"nargs": "?", "const": True, "metavar": "VALUE"} if switch else {"metavar": "VALUE"}
        names = dict.fromkeys(["--" + name, "--" + name.replace("_", "-")])  # TRL's spelling shown in --help
        parser.add_argument(*names, dest=f"trl_{name}", default=None, help=help_text, **kwargs)

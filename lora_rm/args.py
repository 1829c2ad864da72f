"""Options of a run from the command line and a YAML/JSON `--config` file: `lora-rm train`'s flags are transformers'
HfArgumentParser over TrainConfig's fields (types, choices, help and aliases written once, in TrainConfig), the
file fills what the flags leave out (TRL's `TrlParser` pattern), and the names TRL and transformers users type
(`num_train_epochs`, `per_device_train_batch_size`, `bf16: true`, ...) map to the fields. Also the plain parser
the other commands use (no abbreviations, underscore spellings, `--verbose`)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lora_rm.config import AUTO_FIELDS, TrainConfig, config_fields
from lora_rm.errors import UserError
from lora_rm.trl_names import TRL_NAMES, resolve_push, translate_trl_names
from lora_rm.util.bounds import MAX_CONFIG_BYTES, check_file_size

# The names TRL, transformers' TrainingArguments and PEFT users type for a TrainConfig field (its metadata's
# `aliases`), on the command line and in config files. Fields whose names already match (output_dir,
# learning_rate, logging_steps, save_steps, gradient_checkpointing, lora_r, max_length, ...) need none.
ALIASES = {
    alias[2:].replace("-", "_"): f.name for f in config_fields() for alias in f.metadata.get("aliases", ())
}
# TrainingArguments' boolean switches that stand for one value of a field: `bf16: true` is `precision: bf16`.
# ModelConfig's load_in_8bit / load_in_4bit are `quant`'s values. Names that need more than a rename:
# `lora_rm.trl_names`.
FLAG_ALIASES = {
    "bf16": ("precision", "bf16"),
    "fp16": ("precision", "fp16"),
    "load_in_8bit": ("quant", "8bit"),
    "load_in_4bit": ("quant", "4bit"),
}
VERBOSE_HELP = "also show third-party warnings, load reports and progress bars"


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def or_auto(kind: Any) -> Any:
    """An argparse type that also takes `auto` (any case): TrainConfig then chooses the value."""

    def parse(text: str) -> Any:
        return "auto" if text.strip().lower() == "auto" else kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its "invalid float value" message
    return parse


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
    """argparse as lora-rm's other commands use it: no abbreviations (`--lr` is not `--lr-scheduler`), every
    `--long-flag` also answers to `--long_flag` (the spelling of TRL and HfArgumentParser), and `--verbose`."""

    def __init__(self, **kwargs: Any):
        super().__init__(allow_abbrev=False, formatter_class=_HelpFormatter, **kwargs)
        self.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)

    def add_argument(self, *names: Any, **kwargs: Any) -> argparse.Action:
        twins = [
            "--" + n[2:].replace("-", "_")
            for n in names
            if isinstance(n, str) and n.startswith("--") and "-" in n[2:]
        ]
        return super().add_argument(*names, *[t for t in twins if t not in names], **kwargs)


def options_parser(
    names: Iterable[str] | None = None,
    field_defaults: bool = False,
    config_flag: bool = False,
    **kwargs: Any,
) -> argparse.ArgumentParser:
    """transformers' HfArgumentParser over every TrainConfig field (or those in `names`): `--field-name` and
    `--field_name` with the field's type, choices, help and aliases; `--verbose` (and `--config` with
    `config_flag`) first. `kwargs` go to argparse (prog, usage, description).

    Defaults are None, so a --config file can fill what the command line leaves out; with `field_defaults`
    the field's own default is the flag's default (commands that read no config file).
    """
    from transformers import HfArgumentParser  # here: `import lora_rm.cli` must not load transformers

    common = argparse.ArgumentParser(add_help=False)  # a parent: argparse lists its flags first
    common.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    if config_flag:
        common.add_argument("--config", help="YAML or JSON file of options; flags given here override it")
    hints = typing.get_type_hints(TrainConfig)
    wanted = None if names is None else set(names)
    fields = {f.name: f for f in config_fields() if wanted is None or f.name in wanted}
    # Over a copy of the fields: HfArgumentParser rewrites each field's `type` in place (`int | None` -> int).
    copy = dataclasses.make_dataclass(
        "TrainOptions",
        [(n, hints[n], dataclasses.field(default=f.default, metadata=f.metadata)) for n, f in fields.items()],
    )
    parser = HfArgumentParser(
        copy, parents=[common], allow_abbrev=False, formatter_class=_HelpFormatter, **kwargs
    )
    # Where HfArgumentParser differs from lora-rm's flags, set on its actions (argparse has no public list of
    # them; subclassing it would hide the same edits): dash spellings first (argparse names a flag by them in
    # its errors), `(default: X)` and `%` escaped in the help, switches read by `parse_bool` (on/off yes, t/y
    # no, and its message), `auto` for AUTO_FIELDS, a hidden `--no-` for every switch (transformers adds one,
    # shown, only for switches that default to true).
    for action in parser._actions:
        field = fields.get(action.dest)
        if field is None:
            continue
        action.option_strings.sort(key=lambda o: "_" in o[2:])
        if action.nargs == 0:  # transformers' `--no-field`
            action.help = argparse.SUPPRESS
            continue
        default = ("on" if field.default else "off") if isinstance(field.default, bool) else field.default
        action.help = field.metadata["help"].replace("%", "%%")
        action.help += "" if default is None else f" (default: {default})"
        if hints[field.name] is bool:
            action.type, action.metavar = parse_bool, "BOOL"
        if field.name in AUTO_FIELDS:
            action.type = or_auto(action.type)
    for name, field in fields.items():
        if hints[name] is bool and field.default is not True:
            flag = name.replace("_", "-")
            parser.add_argument(
                f"--no-{flag}", f"--no_{name}", dest=name, action="store_false", help=argparse.SUPPRESS
            )
    parser.set_defaults(**{n: f.default if field_defaults else None for n, f in fields.items()})
    return parser


def train_parser(prog: str = "lora-rm train") -> argparse.ArgumentParser:
    """Every TrainConfig field as a flag, plus the TRL / TrainingArguments names of `FLAG_ALIASES` and
    `TRL_NAMES`; defaults are None so a --config file can fill the rest."""
    parser = options_parser(
        config_flag=True,
        prog=prog,
        usage=f"{prog} --base MODEL --dataset DATA [options]   (or --config FILE)",
        description="Train a LoRA reward model on preference pairs. Every option also works as a key in a "
        "--config file; a switch takes no value, true/false, or a --no- prefix (--no-merge).",
    )
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
    return parser


def config_from_args(argv: list[str]) -> TrainConfig:
    """The TrainConfig of `lora-rm train ARGV`: the --config file's options, overridden by the flags given.

    TrlParser's pattern without its `set_defaults_with_config`: argparse would re-read the file's text values
    through the flags' types (a YAML `batch_size: four` refused as an int flag, not named as a config problem),
    and the TRL names and alias conflicts are resolved on the file's keys first. Nor `parse_args_into_dataclasses`,
    which also reads a `<script>.args` file beside sys.argv[0]. SystemExit 2 for bad flags, UserError for a
    bad file or configuration.
    """
    args = vars(train_parser().parse_args(argv))
    args.pop("verbose", None)
    config = args.pop("config", None)
    options = read_config_file(config) if config else {}
    flags = resolve_aliases(
        {k.removeprefix("alias_").removeprefix("trl_"): v for k, v in args.items() if v is not None},
        "command line",
    )
    options.update(flags)
    output_dir = next(f.default for f in config_fields() if f.name == "output_dir")
    return TrainConfig(**resolve_push(options, output_dir))


def resolve_aliases(options: dict[str, Any], where: str) -> dict[str, Any]:
    """`options` with every alias replaced by its field (`num_train_epochs` -> `epochs`, `bf16: true` ->
    `precision: bf16`; a false switch is dropped). UserError naming `where` when an alias and its field, or
    two aliases, give one field different values."""
    out: dict[str, Any] = {}
    given: dict[str, str] = {}
    for key, value in translate_trl_names(options, where).items():
        name = ALIASES.get(key, key)
        if key in FLAG_ALIASES:
            if not isinstance(value, bool):
                raise UserError(f"{where}: {key}: expected true or false, got {value!r}")
            if not value:
                continue
            name, value = FLAG_ALIASES[key]
        if name in out and out[name] != value:
            raise UserError(
                f"{where}: {given[name]} and {key} both set {name} ({out[name]!r} vs {value!r}); give one"
            )
        out[name], given[name] = value, key
    return out


def _loader(path: Path) -> Any:
    """yaml.SafeLoader that refuses aliases (`*name`): options need none, and a few hundred bytes of nested
    aliases expand to billions of values (a "billion laughs" file), in memory and in any message that shows them."""
    import yaml

    class NoAliasLoader(yaml.SafeLoader):
        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise UserError(
                    f"{path}:{event.start_mark.line + 1}: YAML aliases (*{str(event.anchor)[:40]}) are not "
                    "supported in config files; write the value out"
                )
            return super().compose_node(parent, index)

    return NoAliasLoader


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON config file into a dict of TrainConfig fields (dashes or underscores; the TRL and
    TrainingArguments names of `ALIASES`, `FLAG_ALIASES` and `TRL_NAMES` too)."""
    path = Path(path)
    try:
        if path.is_file():
            check_file_size(path, MAX_CONFIG_BYTES, "config file")
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise UserError(f"{path}: cannot read config file ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise UserError(
            f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})"
        ) from None
    import yaml

    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.load(text, Loader=_loader(path))
    except (ValueError, yaml.YAMLError, RecursionError) as e:
        kind = "JSON" if path.suffix.lower() == ".json" else "YAML"
        reason = "nested too deeply" if isinstance(e, RecursionError) else e
        raise UserError(f"{path}: not valid {kind}: {reason}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of option: value, got {type(data).__name__}")
    known = {f.name for f in config_fields()} | set(ALIASES) | set(FLAG_ALIASES) | set(TRL_NAMES)
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UserError(f"{path}: unknown option(s): {', '.join(unknown)}")
    return resolve_aliases(data, str(path))

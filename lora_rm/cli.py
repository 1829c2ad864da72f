"""`lora-rm` command line: flags generated from TrainConfig, user errors printed without a traceback."""

from __future__ import annotations

import argparse
import sys
import types
import typing
from typing import Any

from lora_rm.config import TrainConfig, config_fields, read_config_file
from lora_rm.errors import UserError
from lora_rm.fit import TrainingStopped


def _flag_type(f: Any) -> tuple[Any, dict[str, Any]]:
    hint = typing.get_type_hints(TrainConfig)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = args[0]
    if hint is bool:
        return None, {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(hint) is list:
        return str, {"nargs": "+"}
    return hint, {}


def train_parser(prog: str = "lora-rm train") -> argparse.ArgumentParser:
    """Every TrainConfig field as a flag; defaults are None so a --config file can fill the rest."""
    parser = argparse.ArgumentParser(prog=prog, description="Train a LoRA reward model on preference pairs.")
    parser.add_argument("--config", help="YAML or JSON file of options; flags given here override it")
    for f in config_fields():
        kind, extra = _flag_type(f)
        default = f.default if f.default is not None else "model/data dependent"
        help_text = f"{f.metadata['help']} (default: {default})"
        if kind is not None:
            extra["type"] = kind
        extra |= {k: f.metadata[k] for k in ("choices", "nargs", "const") if k in f.metadata}
        parser.add_argument(
            "--" + f.name.replace("_", "-"), dest=f.name, default=None, help=help_text, **extra
        )
    return parser


def config_from_args(argv: list[str]) -> TrainConfig:
    args = vars(train_parser().parse_args(argv))
    options = read_config_file(args.pop("config")) if args.get("config") else {}
    args.pop("config", None)
    options.update({k: v for k, v in args.items() if v is not None})
    return TrainConfig(**options)


def run_train(argv: list[str]) -> int:
    from lora_rm.train import train

    cfg = config_from_args(argv)
    result = train(cfg)
    m = result.eval_metrics
    if m:
        print(
            f"final eval: accuracy {m['accuracy']:.3f} ({m['ties']} ties), loss {m['loss']:.4f}, {m['n_pairs']} pairs"
        )
    print(
        f"done in {result.seconds:.1f}s: adapter in {result.adapter_dir}"
        + (f", merged model in {result.merged_dir}" if result.merged_dir else "")
    )
    return 0


COMMANDS = {"train": run_train}


def main(argv: list[str] | None = None) -> int:
    """Entry point of `lora-rm`; returns the exit code (2 for input the user can fix)."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(
            f"usage: lora-rm {{{','.join(COMMANDS)}}} [options]   (lora-rm train --help for the options)",
            file=sys.stderr,
        )
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    import transformers

    # The base's "score.weight newly initialized" report is expected: the reward head is new by design.
    transformers.logging.set_verbosity_error()
    try:
        return COMMANDS[argv[0]](argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except TrainingStopped as e:
        print(str(e), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())

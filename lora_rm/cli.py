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
from lora_rm.outdir import Terminated, check_output_file, check_output_folder, terminate_on_sigterm


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
    from accelerate import PartialState

    from lora_rm.train import train

    cfg = config_from_args(argv)
    result = train(cfg)
    if not PartialState().is_main_process:  # under accelerate launch / torchrun, one process reports
        return 0
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


def _model_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument(
        "--model", required=True, help="an adapter folder (RUN/adapter) or merged model (RUN/merged)"
    )
    parser.add_argument("--base", help="base model for an adapter (default: the one recorded in the adapter)")
    parser.add_argument("--device", help="cuda, cuda:1, cpu, ... (default: cuda when available)")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per forward (default: 16)")
    return parser


def _load(args: argparse.Namespace) -> Any:
    from lora_rm.score import RewardModel

    if args.batch_size <= 0:
        raise UserError(f"--batch-size: must be > 0, got {args.batch_size}")
    return RewardModel.from_pretrained(args.model, base=args.base, device=args.device)


def run_score(argv: list[str]) -> int:
    from lora_rm.score import read_score_rows, write_jsonl_atomic

    parser = _model_parser("lora-rm score", "Add a `reward` field to every prompt/response row of a file.")
    parser.add_argument(
        "--input", required=True, help=".jsonl/.json/.csv/.parquet rows with prompt and response"
    )
    parser.add_argument("--output", required=True, help="JSON Lines: each input row plus its reward")
    parser.add_argument(
        "--normalize",
        action="store_true",
        help="(reward - mean) / std of the eval rewards stored with the model",
    )
    args = parser.parse_args(argv)
    check_output_file(args.output, "--output")
    rows = read_score_rows(args.input)  # every bad row reported before the model is loaded
    model = _load(args)
    rewards = model.score(
        [r.fields["prompt"] for r in rows],
        [r.fields["response"] for r in rows],
        args.batch_size,
        args.normalize,
        progress=True,
    )
    write_jsonl_atomic(args.output, [{**r.fields, "reward": x} for r, x in zip(rows, rewards)])
    print(f"scored {len(rows)} rows into {args.output}")
    return 0


def run_compare(argv: list[str]) -> int:
    from lora_rm.checks import text_problem

    parser = _model_parser("lora-rm compare", "Score two responses to one prompt and say which is preferred.")
    parser.add_argument("--prompt", required=True, help="the prompt, formatted as in training")
    parser.add_argument("a", help="response A")
    parser.add_argument("b", help="response B")
    args = parser.parse_args(argv)
    problems = [
        f"{n}: {p}"
        for n, v in (("prompt", args.prompt), ("A", args.a), ("B", args.b))
        if (p := text_problem(v))
    ]
    if problems:
        raise UserError("; ".join(problems))
    result = _load(args).compare(args.prompt, args.a, args.b)
    print(f"reward A: {result['reward_a']:.4f}")
    print(f"reward B: {result['reward_b']:.4f}")
    print(f"P(A preferred): {result['p_a_preferred']:.4f}")
    return 0


def run_eval(argv: list[str]) -> int:
    parser = _model_parser(
        "lora-rm eval",
        "Evaluate a reward model on preference data: eval.json and plots in --output-dir, and the reward "
        "statistics `score --normalize` uses written into the model folder (reward_stats.json).",
    )
    parser.add_argument("--dataset", required=True, help="preference data in any format training accepts")
    parser.add_argument("--split", default="train", help="dataset split (default: train)")
    parser.add_argument("--output-dir", required=True, help="where eval.json and the PNGs go")
    parser.add_argument(
        "--skip-invalid", action="store_true", help="skip bad rows (counted) instead of stopping"
    )
    args = parser.parse_args(argv)
    check_output_folder(args.output_dir, "--output-dir")
    report = _load(args).evaluate(
        args.dataset, args.output_dir, args.split, args.batch_size, args.skip_invalid
    )
    top1 = f", top-1 {report['ranking']['top1_accuracy']:.3f}" if "ranking" in report else ""
    print(
        f"accuracy {report['accuracy']:.3f} ({report['ties']} ties), loss {report['loss']:.4f}, "
        f"ECE {report['calibration']['ece']:.3f}{top1}, {report['n_pairs']} pairs; wrote {args.output_dir}"
    )
    return 0


def run_plan(argv: list[str]) -> int:
    from lora_rm.plan_report import plan_command

    return plan_command(argv)


COMMANDS = {
    "train": run_train,
    "score": run_score,
    "compare": run_compare,
    "eval": run_eval,
    "plan": run_plan,
}


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
    terminate_on_sigterm()  # outside the training loop (which saves a checkpoint first) too
    try:
        return COMMANDS[argv[0]](argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except TrainingStopped as e:
        print(str(e), file=sys.stderr)
        return e.exit_code
    except (KeyboardInterrupt, Terminated) as e:
        print(str(e) or "interrupted", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130


if __name__ == "__main__":
    raise SystemExit(main())

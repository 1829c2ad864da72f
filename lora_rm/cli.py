"""`lora-rm` command line: one function per command (train's flags: `lora_rm.args`), user errors printed without a
traceback."""

from __future__ import annotations

import argparse
import atexit
import gc
import sys
from pathlib import Path
from typing import Any

from lora_rm.args import Parser, config_from_args
from lora_rm.errors import UserError
from lora_rm.training.inputs import RunFinished
from lora_rm.training.loop import TrainingStopped
from lora_rm.training.outdir import Terminated, check_output_file, check_output_folder, terminate_on_sigterm
from lora_rm.util.atomic import NotReplaceable
from lora_rm.util.offline import require_hub
from lora_rm.util.quiet import quiet_third_party, show_third_party


def run_train(argv: list[str]) -> int:
    from accelerate import PartialState

    from lora_rm.training.loop import train

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


def _model_parser(prog: str, description: str, batch_size: int = 16) -> argparse.ArgumentParser:
    parser = Parser(prog=prog, description=description)
    parser.add_argument(
        "--model",
        required=True,
        help="an adapter folder (RUN/adapter) or merged model (RUN/merged), or the hub repo id --push-to-hub wrote",
    )
    parser.add_argument("--base", help="base model for an adapter (default: the one recorded in the adapter)")
    parser.add_argument("--device", help="cuda, cuda:1, cpu, ... (default: cuda when available)")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=batch_size,
        help=f"a forward holds up to this many max_length sequences' tokens, unless --max-tokens-per-batch (default: {batch_size})",
    )
    parser.add_argument(
        "--max-tokens-per-batch",
        type=int,
        help="tokens per forward (rows x width, padding included): bounds scoring memory on CPU and GPU alike",
    )
    parser.add_argument(
        "--dtype",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="precision to score in (default auto: bf16 on GPUs and on CPUs with AVX512-BF16/AMX, else fp32)",
    )
    parser.add_argument(
        "--quant",
        choices=["none", "8bit", "4bit"],
        default="none",
        help="load the base quantized, adapter kept apart (less memory, slower; default none: merged weights)",
    )
    parser.add_argument(
        "--allow-untrained-head",
        action="store_true",
        help="score with a model whose reward head was never trained and saved (a plain base: random rewards)",
    )
    return parser


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _load(args: argparse.Namespace) -> Any:
    from lora_rm.evaluation.reward_model import RewardModel
    from lora_rm.model.folder_checks import check_adapter_config

    if args.batch_size <= 0:
        raise UserError(f"--batch-size: must be > 0, got {args.batch_size}")
    if args.max_tokens_per_batch is not None and args.max_tokens_per_batch <= 0:
        raise UserError(f"--max-tokens-per-batch: must be > 0, got {args.max_tokens_per_batch}")
    base = args.base
    adapter_config = Path(args.model) / "adapter_config.json"
    if base is None and adapter_config.is_file():
        base = check_adapter_config(Path(args.model)).get("base_model_name_or_path")
    if base:
        require_hub(str(base), "base model")  # fail in seconds when the recorded base is out of reach
    return RewardModel.from_pretrained(
        args.model,
        base=args.base,
        device=args.device,
        dtype=args.dtype,
        quant=args.quant,
        max_tokens_per_batch=args.max_tokens_per_batch,
        log=_stderr,
        allow_untrained_head=args.allow_untrained_head,
    )


def run_score(argv: list[str]) -> int:
    from lora_rm.data.checks import read_score_rows
    from lora_rm.util.atomic import write_jsonl_atomic

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
    check_output_file(args.output, "--output", keep=(args.model, args.input))
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
    print(f"scored {len(rows)} row{'s' * (len(rows) != 1)} into {args.output}")
    return 0


def run_compare(argv: list[str]) -> int:
    from lora_rm.data.checks import text_problem

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
        "Evaluate a reward model on preference data: eval.json, the PNGs and reward_stats.json in --output-dir. "
        "The model folder is left as it is unless --update-stats.",
    )
    parser.add_argument("--dataset", required=True, help="preference data in any format training accepts")
    parser.add_argument(
        "--split", help="dataset split (default: its test split where it has one, else train)"
    )
    parser.add_argument(
        "--output-dir", required=True, help="where eval.json, reward_stats.json and the PNGs go"
    )
    parser.add_argument(
        "--update-stats",
        action="store_true",
        help="also write this data's reward statistics into the model folder: `score --normalize` then uses them",
    )
    parser.add_argument(
        "--skip-invalid", action="store_true", help="skip bad rows (counted) instead of stopping"
    )
    args = parser.parse_args(argv)
    check_output_folder(args.output_dir, "--output-dir")
    _load(args).evaluate(
        args.dataset,
        args.output_dir,
        args.split,
        args.batch_size,
        args.skip_invalid,
        save_stats=args.update_stats,
    )
    if args.update_stats:  # the summary itself is evaluate's one "eval: accuracy ..." line
        print(f"reward statistics also written to {Path(args.model) / 'reward_stats.json'}")
    return 0


def run_serve(argv: list[str]) -> int:
    import os

    from lora_rm.serving.guard import Guards, listen_socket
    from lora_rm.serving.request import Limits
    from lora_rm.serving.server import require_serve_extra, serve

    parser = _model_parser(
        "lora-rm serve",
        "Serve rewards over HTTP until SIGTERM or Ctrl-C: POST /get_reward (OpenRLHF's --remote_rm_url), "
        "POST /score, GET /health. Needs `pip install lora_rm[serve]`.",
        batch_size=32,
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port; 0 picks a free one (default: 8000)")
    parser.add_argument(
        "--normalize",
        action="store_true",
        help="serve (reward - mean) / std of the eval rewards stored with the model",
    )
    parser.add_argument(
        "--max-request-texts", type=int, default=Limits.max_request_texts, help="texts or rows per request"
    )
    parser.add_argument(
        "--max-text-chars", type=int, default=Limits.max_text_chars, help="characters per text or row"
    )
    parser.add_argument(
        "--max-request-tokens",
        type=int,
        help="tokens per request, its texts or rows as scored (each cut to the model's max_length); "
        "more get 413 (default: no cap beyond --max-request-texts x max_length)",
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("LORA_RM_SERVE_TOKEN"),
        help="require the token on every POST, as `Authorization: Bearer TOKEN` or ?token=TOKEN in the URL "
        "(default: $LORA_RM_SERVE_TOKEN; set one when --host is reachable from other machines)",
    )
    for name, default, what in (
        ("--header-timeout", Guards.header_timeout, "seconds a client may take to send a request's headers"),
        ("--body-timeout", Guards.body_timeout, "seconds a client may take to send a request's body"),
        ("--drain-timeout", Guards.drain_timeout, "seconds SIGTERM waits for requests in flight"),
    ):
        parser.add_argument(name, type=float, default=default, help=f"{what} (default: {default:g})")
    parser.add_argument(
        "--max-connections", type=int, default=None, help="open connections; more get 503 (default: 1000)"
    )
    args = parser.parse_args(argv)
    require_serve_extra()
    limits = Limits(args.max_request_texts, args.max_text_chars, args.max_request_tokens)
    guards = Guards(
        header_timeout=args.header_timeout,
        body_timeout=args.body_timeout,
        drain_timeout=args.drain_timeout,
        max_connections=args.max_connections,
        token=args.token,
    )
    sock = listen_socket(args.host, args.port)  # a taken port fails before the model loads
    model = _load(args)
    if args.normalize:
        model._normalizer()  # no stored statistics: refused now, not on every request
    return serve(model, sock, args.batch_size, args.normalize, limits, guards)


def run_plan(argv: list[str]) -> int:
    from lora_rm.training.plan_report import plan_command

    return plan_command(argv)


COMMANDS = {  # name: (function, one line for `lora-rm --help`)
    "train": (run_train, "train a LoRA reward model on preference pairs"),
    "score": (run_score, "add a reward to every prompt/response row of a file"),
    "compare": (run_compare, "score two responses to one prompt; which is preferred"),
    "eval": (run_eval, "evaluate a reward model on preference data: eval.json, calibration, plots"),
    "plan": (run_plan, "estimate training memory from a model config; what fits your GPU"),
    "serve": (run_serve, "serve rewards over HTTP (OpenRLHF's --remote_rm_url, /score, /health)"),
}


def usage() -> str:
    lines = [f"usage: lora-rm {{{','.join(COMMANDS)}}} [options]", "", "commands:"]
    lines += [f"  {name:<8} {line}" for name, (_, line) in COMMANDS.items()]
    lines += [
        "",
        "lora-rm COMMAND --help lists a command's options. Every --long-flag also answers to --long_flag, and",
        "train takes TRL / TrainingArguments names (--per_device_train_batch_size, --num_train_epochs, --bf16, ...).",
        "--verbose (any command) also shows third-party warnings, load reports and progress bars.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `lora-rm`; returns the exit code (2 for input the user can fix)."""
    argv = sys.argv[1:] if argv is None else argv
    # At exit the interpreter's last collection walks and frees, one by one, every object torch, transformers
    # and the model left (over a second after training GPT-2 small) for memory the OS takes back at once.
    # Frozen objects are skipped; Python never promised finalizers of objects still alive at exit.
    atexit.register(gc.freeze)
    if argv and argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if not argv or argv[0] not in COMMANDS:
        problem = f"unknown command {argv[0]!r}" if argv else "no command given"
        print(f"{usage()}\nerror: {problem}", file=sys.stderr)
        return 2
    if "--verbose" not in argv:
        quiet_third_party()
    else:
        show_third_party()  # the Python API's quiet default too
    terminate_on_sigterm()  # outside the training loop (which saves a checkpoint first) too
    try:
        return COMMANDS[argv[0]][0](argv[1:])
    except (UserError, NotReplaceable) as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except RunFinished as e:
        print(str(e))
        return e.exit_code
    except TrainingStopped as e:
        print(str(e), file=sys.stderr)
        return e.exit_code
    except (KeyboardInterrupt, Terminated) as e:
        print(str(e) or "interrupted", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130


if __name__ == "__main__":
    raise SystemExit(main())

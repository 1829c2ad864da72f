"""Held-out accuracy of the reward read where transformers reads it (the last token of the text, this version)
against lora_rm 0.1's reading (an EOS appended to every sequence and the reward read there), on a real causal
LM, same code, data and settings.

    python scripts/make_smollm2.py /tmp/smollm2                 # SmolLM2-135M-Instruct
    python benchmarks/reading.py --base /tmp/smollm2 --seeds 0 1 2

Both readings run in this checkout, so they share everything else (head init, learning rate, batching). The
appended-EOS reading is built the way a user would get it from any tool: the EOS is written at the end of
every chosen and rejected text (`<|im_end|>` for SmolLM2), and the base's tokenizer gets a pad token distinct
from EOS (its `<|endoftext|>`, id 0), so transformers pools the EOS instead of skipping it as padding. The
sequences are then the last-token reading's plus one EOS id. `--old DIR` adds lora_rm 0.1's own run (a
checkout of commit 13b940e: `git worktree add ../lora_rm-0.1 13b940e`), which also differs in head init.

Reads the HH benchmark pairs (Anthropic HH harmless, implicit prompt; quality.DATA) or --data, shuffles it
with --data-seed, holds out --heldout pairs and trains on the next --train. Each run is `lora-rm train` as a
user types it, with the held-out file as --eval-dataset; the accuracy is each run's own final evaluation
(eval/eval.json), i.e. each model read the way it was trained. Prints a markdown table per seed, the mean +-
sd of each reading and of the paired differences. `--rest` also scores every model with `lora-rm eval` on all
the pairs used neither for training nor held out (with --train 500 --heldout 300, the other 1,000 of the
1,800: a tighter comparison for no more training; on a CPU slow, as `lora-rm eval` scores in fp32 on plain
padded rows: over 15 minutes per SmolLM2 model on 2 busy cores); `--reuse` reads back runs already finished in
--out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import DATA, shuffled_rows, split_data  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def lora_rm_cli(checkout: Path, cwd: Path, *argv: str) -> None:
    """`lora-rm ARGV` with the package of `checkout` (PYTHONPATH), offline, run from `cwd` (an output folder):
    `python -c` puts the working directory first on sys.path, before PYTHONPATH, so from this repository's
    root it would import this checkout's package instead of --old's."""
    env = {**os.environ, "PYTHONPATH": str(checkout), "HF_HUB_OFFLINE": "1"}
    code = "import sys; from lora_rm.cli import main; sys.exit(main(sys.argv[1:]))"
    subprocess.run([sys.executable, "-c", code, *argv], env=env, check=True, capture_output=True, cwd=cwd)


def run(checkout: Path, args, base: Path, seed: int, train_file: Path, heldout: Path, out: Path) -> dict:
    flags = [
        "--base", str(base), "--dataset", str(train_file), "--eval-dataset", str(heldout),
        "--output-dir", str(out), "--quant", args.quant, "--precision", args.precision,
        "--max-length", str(args.max_length), "--batch-size", str(args.batch_size),
        "--gradient-accumulation-steps", str(args.accumulation), "--learning-rate", str(args.learning_rate),
        "--epochs", "1", "--seed", str(seed), "--eval-steps", "100000", "--save-steps", "100000",
    ]  # fmt: skip
    if args.reuse and (out / "eval" / "eval.json").is_file():
        report = json.loads((out / "eval" / "eval.json").read_text(encoding="utf-8"))
        return {"accuracy": report["accuracy"], "loss": report["loss"], "seconds": float("nan")}
    started = time.perf_counter()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    lora_rm_cli(checkout, out, "train", *flags)
    report = json.loads((out / "eval" / "eval.json").read_text(encoding="utf-8"))
    saved = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert saved.get("sequence_format") == (None if checkout != ROOT else 2), f"{checkout} did not run"
    return {"accuracy": report["accuracy"], "loss": report["loss"], "seconds": time.perf_counter() - started}


def eval_rest(checkout: Path, out: Path, rest: Path) -> dict:
    """`lora-rm eval` of the run in `out` on `rest` (pairs used neither for training nor for --heldout)."""
    flags = ["--model", str(out / "adapter"), "--dataset", str(rest), "--output-dir", str(out / "rest-eval")]
    lora_rm_cli(checkout, out, "eval", *flags)
    report = json.loads((out / "rest-eval" / "eval.json").read_text(encoding="utf-8"))
    return {"accuracy": report["accuracy"], "n": report["n_pairs"]}


def eos_base(base: Path, out: Path) -> tuple[Path, str]:
    """A view of `base` whose tokenizer and config pad with special token id 0 (SmolLM2: `<|endoftext|>`)
    instead of EOS (weights linked, not copied), and the EOS text to append. Refuses a base whose pad already
    differs from EOS."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    if tokenizer.eos_token is None or tokenizer.pad_token_id not in (None, tokenizer.eos_token_id):
        raise SystemExit(f"{base}: expected a tokenizer with EOS and pad == EOS or no pad")
    pad = tokenizer.convert_ids_to_tokens(0)
    if pad == tokenizer.eos_token or pad not in tokenizer.all_special_tokens:
        raise SystemExit(f"{base}: token id 0 ({pad!r}) is not a special token distinct from EOS")
    view = out / "base-distinct-pad"
    shutil.rmtree(view, ignore_errors=True)
    view.mkdir(parents=True)
    for f in base.iterdir():
        if f.suffix not in (".json", ".jinja", ".txt", ".model"):
            (view / f.name).symlink_to(f.resolve())
        elif f.name != "config.json":
            shutil.copy(f, view / f.name)
    config = json.loads((base / "config.json").read_text(encoding="utf-8"))
    config["pad_token_id"] = 0
    (view / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    tokenizer.pad_token = pad
    tokenizer.save_pretrained(view)
    return view, tokenizer.eos_token


def with_eos(path: Path, eos: str, out: Path) -> Path:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    rows = [{**r, "chosen": r["chosen"] + eos, "rejected": r["rejected"] + eos} for r in rows]
    out.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, type=Path, help="a causal LM folder, e.g. SmolLM2-135M")
    parser.add_argument("--old", type=Path, help="also run a checkout of lora_rm 0.1 (commit 13b940e)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--data", type=Path, default=DATA, help="preference pairs (JSON lines, .gz or not)")
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=600)
    parser.add_argument("--heldout", type=int, default=600)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--accumulation", type=int, default=2)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument(
        "--rest", action="store_true", help="also evaluate every model on all pairs left over (lora-rm eval)"
    )
    parser.add_argument("--reuse", action="store_true", help="read back runs already finished in --out")
    parser.add_argument("--quant", default="none")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "reading")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    train_file, heldout = split_data(args.out, args.train, args.heldout, args.data_seed, args.data)
    rest = None
    if args.rest:
        rest = args.out / "rest.jsonl"
        left = shuffled_rows(args.data, args.data_seed)[args.heldout + args.train :]
        rest.write_text("".join(json.dumps(r) + "\n" for r in left), encoding="utf-8")
    view, eos = eos_base(args.base.resolve(), args.out)
    readings = {
        "last token (this version)": (ROOT, args.base.resolve(), train_file, heldout, rest),
        "appended EOS": (
            ROOT, view, with_eos(train_file, eos, args.out / "train-eos.jsonl"),
            with_eos(heldout, eos, args.out / "heldout-eos.jsonl"),
            rest and with_eos(rest, eos, args.out / "rest-eos.jsonl"),
        ),
    }  # fmt: skip
    if args.old:
        readings["appended EOS (lora_rm 0.1)"] = (
            args.old.resolve(),
            args.base.resolve(),
            train_file,
            heldout,
            None,
        )
    results: dict[str, list[dict]] = {name: [] for name in readings}
    print(
        f"{args.base.name}: {args.train} HH pairs, 1 epoch, {args.batch_size} x {args.accumulation} pairs a step, "
        f"lr {args.learning_rate}, {args.quant}, {args.precision}, max_length {args.max_length}; "
        f"{args.heldout} held-out pairs"
        + (" and all pairs left over (`lora-rm eval`)" if rest else "")
        + "\n"
    )
    extra = " left over: accuracy (pairs) | all held-out |" if rest else ""
    print(
        f"| seed | reading | held-out accuracy | loss | time (s) |{extra}\n|---:|---|---:|---:|---:|"
        + "---:|" * (2 * bool(rest))
    )
    for seed in args.seeds:
        for n, (name, (checkout, base, train, held, left)) in enumerate(readings.items()):
            out = args.out / f"seed{seed}-{n}"
            r = run(checkout, args, base, seed, train, held, out)
            row = f"| {seed} | {name} | {r['accuracy']:.3f} | {r['loss']:.4f} | {r['seconds']:.0f} |"
            if left:
                more = eval_rest(checkout, out, left)
                r["all"] = (r["accuracy"] * args.heldout + more["accuracy"] * more["n"]) / (
                    args.heldout + more["n"]
                )
                row += f" {more['accuracy']:.3f} ({more['n']}) | {r['all']:.3f} |"
            results[name].append(r)
            print(row, flush=True)
    print()
    first = next(iter(results.values()))
    for key, what in (("accuracy", f"{args.heldout} held-out pairs"), ("all", "all held-out pairs")):
        for name, rs in results.items():
            if not all(key in r for r in rs):
                continue
            acc = [r[key] for r in rs]
            line = f"{name}, {what}: accuracy {statistics.mean(acc):.3f} +- {_sd(acc):.3f}"
            if rs is not first:
                diff = [a[key] - b[key] for a, b in zip(first, rs)]
                line += f"; last token minus this: {statistics.mean(diff):+.3f} +- {_sd(diff):.3f}"
            print(line + f" over seeds {args.seeds}")


def _sd(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


if __name__ == "__main__":
    main()

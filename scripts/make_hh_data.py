"""Build the HH benchmark pairs: preference pairs from Anthropic HH-RLHF's harmless-base test split.

    python scripts/make_hh_data.py                        # -> benchmarks/data/hh_harmless_dev.jsonl.gz
    python scripts/make_hh_data.py OUT.jsonl.gz --pairs 1800 --seed 0

Downloads `harmless-base/test.jsonl.gz` (2,312 pairs, MIT licence; Bai et al. 2022, "Training a Helpful and
Harmless Assistant with RLHF") from the hub dataset `Anthropic/hh-rlhf` and writes a random --pairs of them,
one JSON object a line with `chosen` and `rejected` (full dialogues: the prompt is their shared prefix).
benchmarks/quality.py, throughput.py, startup.py, defaults.py and reading.py read this file, or the one named
by $LORA_RM_HH_DATA. The figures in docs/benchmarks.md were measured on one fixed draw of 1,800 of the 2,312
pairs; another draw gives figures of the same kind, not the same digits.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "data" / "hh_harmless_dev.jsonl.gz"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", type=Path, default=OUT)
    parser.add_argument("--pairs", type=int, default=1800, help="how many pairs to keep (at most 2,312)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random draw")
    args = parser.parse_args(argv)
    from huggingface_hub import hf_hub_download

    path = hf_hub_download("Anthropic/hh-rlhf", "harmless-base/test.jsonl.gz", repo_type="dataset")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows = random.Random(args.seed).sample(rows, min(args.pairs, len(rows)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(args.out, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write(
                json.dumps({"chosen": row["chosen"], "rejected": row["rejected"]}, ensure_ascii=False) + "\n"
            )
    print(f"wrote {len(rows)} pairs to {args.out}")


if __name__ == "__main__":
    main()

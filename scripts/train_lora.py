"""Train a LoRA reward model: `python scripts/train_lora.py --base gpt2 --dataset DATA --output-dir runs/rm`.

The same as `lora-rm train ...`; see `--help` for every option.
"""

import sys

from lora_rm.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["train", *sys.argv[1:]]))

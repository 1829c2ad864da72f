"""Build the tiny random GPT-2 style model and tokenizer used by the examples and tests.

The tokenizer is a byte-level BPE (vocab 2048) trained on the example preference data; like GPT-2 it
has no pad token. The model is a randomly initialised ``GPT2LMHeadModel`` (a causal LM base, the same
kind of checkpoint as ``gpt2``), small enough to commit (well under 2 MB).

Run from the repository root, after ``scripts/make_example_data.py``::

    python scripts/make_tiny_model.py
"""

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "examples" / "data"
EOS_TOKEN = "<|endoftext|>"
VOCAB_SIZE = 2048
MAX_LENGTH = 256


def parse_args() -> argparse.Namespace:
    """Parse command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "examples" / "tiny-gpt2")
    parser.add_argument(
        "--data",
        type=Path,
        nargs="+",
        default=[DATA_DIR / "prefs_train.jsonl", DATA_DIR / "prefs_eval.jsonl"],
        help="preference jsonl files whose texts train the tokenizer",
    )
    return parser.parse_args()


def iter_texts(paths: list[Path]) -> Iterator[str]:
    """Yield every prompt+response text from the given preference jsonl files."""
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                yield row["prompt"] + row["chosen"]
                yield row["prompt"] + row["rejected"]


def train_tokenizer(paths: list[Path]) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer and wrap it as a GPT-2 like fast tokenizer (no pad token)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(iter_texts(paths), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        model_max_length=MAX_LENGTH,
        clean_up_tokenization_spaces=False,
    )


def build_model(tokenizer: PreTrainedTokenizerFast) -> GPT2LMHeadModel:
    """Create a small randomly initialised GPT-2 causal LM matching ``tokenizer``."""
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=MAX_LENGTH,
        n_embd=64,
        n_layer=2,
        n_head=4,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return GPT2LMHeadModel(config)


def main() -> None:
    """Train the tokenizer, build the model and save both to ``--output-dir``."""
    args = parse_args()
    tokenizer = train_tokenizer(args.data)
    model = build_model(tokenizer)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(args.output_dir)
    model.save_pretrained(args.output_dir)
    n_params = sum(p.numel() for p in model.parameters())
    size = sum(p.stat().st_size for p in args.output_dir.iterdir() if p.is_file())
    print(f"saved tokenizer ({len(tokenizer)} tokens) and model ({n_params} params) to {args.output_dir}")
    print(f"folder size: {size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()

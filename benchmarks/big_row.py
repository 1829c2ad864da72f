"""Memory and time to read, check and encode one very large row (a 53 MB response), as training does.

    python benchmarks/big_row.py            # prints peak RSS and seconds

Writes the row to a temporary JSONL file, then runs the data step (`load_rows`, `check_rows`, `encode_pairs`
with max_length 64 on examples/tiny-gpt2's tokenizer) in this process and prints what it cost.
"""

from __future__ import annotations

import json
import resource
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    from lora_rm.data.checks import check_rows, detect_format
    from lora_rm.data.encode import encode_pairs
    from lora_rm.data.read import load_rows
    from lora_rm.model.load import load_tokenizer

    tokenizer = load_tokenizer(str(ROOT / "examples" / "tiny-gpt2"))
    big = {
        "prompt": "question : how ? answer :",
        "chosen": " sure " + "first you should mix then heat " * 1_700_000,
    }
    rows = [{**big, "rejected": " no"}, {"prompt": "q", "chosen": " a", "rejected": " b"}]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        size = path.stat().st_size
        started = time.perf_counter()
        read = load_rows(str(path))[0]
        fmt = detect_format(read, str(path))
        pairs, report = encode_pairs(check_rows(read, fmt, str(path)), fmt, tokenizer, max_length=64)
        seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(f"{size / 1e6:.0f} MB file, {len(pairs)} pairs: {report.summary()}")
    print(f"read + check + encode: {seconds:.1f} s, peak RSS of the process {peak:.0f} MB")


if __name__ == "__main__":
    main()

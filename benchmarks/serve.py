"""Reward-server throughput: `lora-rm serve` (concurrent requests batched into shared forwards) against a
naive server, a FastAPI handler that calls `transformers.pipeline` on each request as it comes. Both are real
uvicorn processes on the same model, device and torch threads; the clients are asyncio tasks of this process,
each sending `/get_reward` requests (OpenRLHF's protocol) one after the other. The attack column: the p99
latency of a small probe request while 200 sockets send their headers a line a second and one huge request
(4096 texts) is in flight (benchmarks/serve_attack.py).

    python scripts/train_lora.py --config examples/quickstart.yaml      # writes runs/quickstart/merged
    python benchmarks/serve.py                                          # the table in docs/benchmarks.md
    python benchmarks/serve.py --smoke --model PATH                     # a few requests (CI)

The naive handler is `async def`, like OpenRLHF's own `serve_rm`, so it scores one request at a time: a plain
`def` handler would run pipelines from several threads at once, which a fast tokenizer does not allow
("Already borrowed"). Texts are prompt + response from examples/data/prefs_eval.jsonl.
"""

# No `from __future__ import annotations`: FastAPI reads the handler's annotation (Request) at runtime.
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from serve_attack import probe_under_attack

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data" / "prefs_eval.jsonl"


def baseline_server(model: str, port: int, device: str | None) -> int:
    """The naive server: one pipeline call per request, rewards raw (no sigmoid: function_to_apply="none")."""
    import torch
    import uvicorn
    from fastapi import FastAPI, Request
    from transformers import pipeline

    from lora_rm.serving.guard import listen_socket

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = pipeline("text-classification", model=model, device=device, function_to_apply="none")
    app = FastAPI()

    async def get_reward(request: Request) -> dict:
        texts = (await request.json())["query"]
        return {"rewards": [out["score"] for out in pipe(texts, function_to_apply="none")]}

    app.post("/get_reward")(get_reward)
    sock = listen_socket("127.0.0.1", port)
    print(f"serving {model} on http://127.0.0.1:{sock.getsockname()[1]}", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
    return 0


def gpt2_small(out: Path) -> Path:
    """A GPT-2-small-sized sequence-classification model with random weights (seed 0) and the quickstart
    tokenizer, saved to `out` unless it is there already."""
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(ROOT / "examples" / "tiny-gpt2")
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    ids = {k: tokenizer.pad_token_id for k in ("pad_token_id", "bos_token_id", "eos_token_id")}
    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(GPT2Config(vocab_size=len(tokenizer), num_labels=1, **ids))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


class Process:
    """A server started in the background; its URL is read from the line it prints when ready."""

    def __init__(self, cmd: list[str], log: Path, threads: int):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        self.log = log
        with log.open("w", encoding="utf-8") as out:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)

    def url(self, timeout: float = 300) -> str:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(
                    f"server exited {self.proc.returncode}:\n{self.log.read_text(encoding='utf-8')}"
                )
            text = self.log.read_text(encoding="utf-8")
            if "serving " in text:
                url = text.split("serving ", 1)[1].split(" on ", 1)[1].split()[0]
                try:
                    httpx.post(url + "/get_reward", json={"query": ["warm up"]}, timeout=60)
                    return url
                except httpx.TransportError:
                    pass
            time.sleep(0.2)
        raise SystemExit(f"server not ready after {timeout} s: {self.log}")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


def load_texts(n: int) -> list[str]:
    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()]
    texts = [r["prompt"] + r[side] for r in rows for side in ("chosen", "rejected")]
    return (texts * (n // len(texts) + 1))[:n]


async def _post(reader, writer, host: str, path: str, body: bytes) -> tuple[int, bytes]:
    """One HTTP/1.1 POST on a kept-alive connection; (status, body)."""
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:] if ": " in line)}
    length = headers.get("content-length")
    if length is None:  # both servers answer with a Content-Length; anything else is not measured here
        raise SystemExit(f"{host}{path}: a response without Content-Length: {head[:200]!r}")
    return int(lines[0].split()[1]), await reader.readexactly(int(length))


def measure(url: str, texts: list[str], concurrency: int, requests: int, per_request: int) -> dict:
    """`requests` POSTs of `per_request` texts each, `concurrency` at a time; requests/s, latencies, and the
    rewards by text.

    The clients are asyncio tasks of this process, each with one kept-alive connection, speaking HTTP/1.1
    with asyncio's own streams: httpx's client cost more CPU per request than either server on this 2-core
    machine (a one-off probe of /proc CPU times: 1.28 s for 400 requests at concurrency 32 against the
    servers' 0.8-0.9 s), so it measured itself rather than the servers.
    """
    import asyncio
    from urllib.parse import urlsplit

    latencies: list[float] = []
    rewards: dict[str, float] = {}
    errors: list[str] = []
    counter = iter(range(requests))
    address = urlsplit(url)

    async def client() -> None:
        reader, writer = await asyncio.open_connection(address.hostname, address.port)
        try:
            for i in counter:  # shared: each request is sent once, by whichever client is free
                batch = [texts[(i * per_request + j) % len(texts)] for j in range(per_request)]
                body = json.dumps({"query": batch}).encode()
                start = time.perf_counter()
                status, answer = await _post(reader, writer, address.netloc, "/get_reward", body)
                latencies.append(time.perf_counter() - start)
                scores = json.loads(answer).get("rewards") if status == 200 else None
                if scores is None or len(scores) != len(batch):
                    errors.append(f"{status} {answer[:200]!r}")
                else:
                    rewards.update(zip(batch, scores))
        finally:
            writer.close()

    async def run() -> float:
        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        return time.perf_counter() - start

    seconds = asyncio.run(run())
    if errors:
        raise SystemExit(f"{url}: {len(errors)} failed requests, first: {errors[0]}")
    return {"rps": requests / seconds, "latencies": latencies, "rewards": rewards}


def summary(runs: list[dict]) -> dict:
    """The median requests/s of the repeats, and latency percentiles over all their requests (ms)."""
    p50, p99 = percentiles([x for run in runs for x in run["latencies"]])
    return {"rps": statistics.median(r["rps"] for r in runs), "p50": p50, "p99": p99}


def percentiles(seconds: list[float]) -> tuple[float, float]:
    """p50 and p99 of latencies, in ms."""
    latencies = sorted(x * 1000 for x in seconds)
    return statistics.median(latencies), latencies[
        min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default=str(ROOT / "runs" / "quickstart" / "merged"), help="a merged model"
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32], help="client threads")
    parser.add_argument("--requests", type=int, default=800, help="requests per concurrency level and server")
    parser.add_argument("--texts-per-request", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32, help="lora-rm serve --batch-size")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads in each server (OMP_NUM_THREADS)"
    )
    parser.add_argument("--device", help="cuda, cpu, ... (default: cuda when available)")
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs of each level; requests/s is their median"
    )
    parser.add_argument("--probes", type=int, default=200, help="probe requests of the attack column")
    parser.add_argument("--smoke", action="store_true", help="concurrency 1 and 4, 40 requests, 1 run (CI)")
    parser.add_argument(
        "--gpt2-small",
        action="store_true",
        help="serve a GPT-2-small-sized reward model (87M parameters, random weights, the quickstart tokenizer), "
        "written to runs/serve-gpt2-small if missing: where the model, not HTTP, does most of the work",
    )
    parser.add_argument("--baseline-server", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.baseline_server:
        return baseline_server(args.model, args.port, args.device)
    if args.smoke:
        args.concurrency, args.requests, args.repeats, args.probes = [1, 4], 40, 1, 10
    if args.gpt2_small:
        args.model = str(gpt2_small(ROOT / "runs" / "serve-gpt2-small"))
    args.model = os.path.relpath(Path(args.model).resolve(), ROOT)  # the servers run in ROOT
    if not (ROOT / args.model / "config.json").is_file():
        raise SystemExit(
            f"{args.model}: no merged model; run `python scripts/train_lora.py --config examples/quickstart.yaml`"
        )

    import tempfile

    device = ["--device", args.device] if args.device else []
    tmp = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    ours = Process(
        [sys.executable, "-m", "lora_rm.cli", "serve", "--model", args.model, "--port", "0",
         "--batch-size", str(args.batch_size), *device],
        tmp / "lora-rm-serve.log", args.threads,
    )  # fmt: skip
    naive = Process(
        [sys.executable, __file__, "--baseline-server", "--model", args.model, *device],
        tmp / "baseline.log",
        args.threads,
    )
    try:
        urls = {"lora-rm serve": ours.url(), "naive pipeline": naive.url()}
        texts = load_texts(max(400, args.requests * args.texts_per_request))
        runs: dict[tuple[str, int], list[dict]] = {(name, c): [] for name in urls for c in args.concurrency}
        for _ in range(args.repeats):  # the servers alternate, so a change in machine load hits both
            for c in args.concurrency:
                for name, url in urls.items():
                    measure(url, texts, c, max(c, args.requests // 10), args.texts_per_request)  # warm-up
                    runs[name, c].append(measure(url, texts, c, args.requests, args.texts_per_request))
        attacked = {name: probe_under_attack(url, texts, args.probes) for name, url in urls.items()}
    finally:
        ours.stop()
        naive.stop()

    print(
        f"{args.model}: {args.requests} requests of {args.texts_per_request} text(s) per level and run, "
        f"{args.repeats} run(s), "
        f"lora-rm serve --batch-size {args.batch_size}, {args.threads} torch thread(s) per server, "
        f"device {args.device or 'default'}\n"
    )
    print(
        "| server | concurrency | requests/s | p50 latency (ms) | p99 latency (ms) | vs naive "
        "| attack: probe p99 (ms) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for c in args.concurrency:
        for name in urls:
            r, base = summary(runs[name, c]), summary(runs["naive pipeline", c])
            print(
                f"| {name} | {c} | {r['rps']:.0f} | {r['p50']:.1f} | {r['p99']:.1f} | "
                f"{r['rps'] / base['rps']:.2f}x | {percentiles(attacked[name]['latencies'])[1]:.1f} |"
            )
    print(
        f"\nattack: {args.probes} probes of one text, one after the other, each on a new connection, while 200"
    )
    print(
        "sockets send headers a line a second and one request of 4096 texts is in flight; a probe unanswered"
    )
    print("in 30 s counts as 30 s.")
    for name, a in attacked.items():
        print(
            f"  {name}: {len(a['latencies'])} probes (at most 60 s of them), probe p50 {percentiles(a['latencies'])[0]:.1f} ms, {a['failed']} unanswered, "
            f"{a['slow_opened']} slow connections opened, {a['huge_answered']} huge requests answered"
        )
    a, b = (runs[name, args.concurrency[0]][0]["rewards"] for name in urls)
    diff = max(abs(a[t] - b[t]) for t in a if t in b)
    print(f"\nmax |reward difference| between the two servers over the same texts: {diff:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

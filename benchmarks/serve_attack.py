"""The attack column of benchmarks/serve.py: how long a small /get_reward request (the probe, on a fresh
connection) takes while `slow` sockets send their headers one line a second (reconnecting when the server cuts
them, as a hostile client would) and one huge request is in flight (sent again as soon as it is answered).

    python benchmarks/serve_attack.py http://127.0.0.1:8000     # attack a running server, print probe latencies
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from urllib.parse import urlsplit


async def _slow_socket(host: str, port: int, stop: asyncio.Event, opened: list[int]) -> None:
    """Keeps one connection open that never finishes its headers."""
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            await asyncio.sleep(0.5)
            continue
        opened[0] += 1
        writer.write(b"POST /get_reward HTTP/1.1\r\nHost: x\r\n")
        try:
            while not stop.is_set():
                try:
                    await asyncio.wait_for(reader.read(65536), 1.0)
                    break  # answered (408, 503) or closed by the server: reconnect
                except TimeoutError:
                    writer.write(b"X-Slow: 1\r\n")
                    await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()


async def _post(host: str, port: int, body: bytes, timeout: float) -> int:
    """One POST /get_reward on a new connection; its status (0: no answer in `timeout` s or a dropped
    connection)."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, TimeoutError):
        return 0
    try:
        head = f"POST /get_reward HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        writer.write(f"{head}Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        answer = await asyncio.wait_for(reader.read(), timeout)
        return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0
    except (OSError, TimeoutError, ValueError):
        return 0
    finally:
        writer.close()


async def _huge(host: str, port: int, body: bytes, stop: asyncio.Event, answered: list[int]) -> None:
    while not stop.is_set():
        if await _post(host, port, body, 600) == 200:
            answered[0] += 1


def probe_under_attack(
    url: str,
    texts: list[str],
    probes: int,
    slow: int = 200,
    huge_texts: int = 4096,
    timeout: float = 30,
    max_seconds: float = 60,
) -> dict:
    """Latencies (s) of up to `probes` one-text requests, one after the other, while the attack runs (for at
    most `max_seconds`); a probe with no 200 answer within `timeout` s counts as `timeout`. Also how many slow connections were opened and how
    many huge requests were answered meanwhile."""
    address = urlsplit(url)
    host, port = address.hostname, address.port
    huge = json.dumps({"query": [texts[i % len(texts)] for i in range(huge_texts)]}).encode()

    async def run() -> dict:
        stop, opened, answered = asyncio.Event(), [0], [0]
        attackers = [asyncio.create_task(_slow_socket(host, port, stop, opened)) for _ in range(slow)]
        attackers.append(asyncio.create_task(_huge(host, port, huge, stop, answered)))
        await asyncio.sleep(1.0)  # the sockets are open and the huge request is in
        latencies, failed, began = [], 0, time.perf_counter()
        for i in range(probes):
            if time.perf_counter() - began > max_seconds:
                break
            body = json.dumps({"query": [texts[i % len(texts)]]}).encode()
            start = time.perf_counter()
            ok = await _post(host, port, body, timeout) == 200
            latencies.append(time.perf_counter() - start if ok else timeout)
            failed += not ok
        stop.set()
        for task in attackers:
            task.cancel()
        await asyncio.gather(*attackers, return_exceptions=True)
        return {
            "latencies": latencies,
            "failed": failed,
            "slow_opened": opened[0],
            "huge_answered": answered[0],
        }

    return asyncio.run(run())


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    texts = ["question : how do i make a cake ? answer : mix then heat"] * 8
    result = probe_under_attack(argv[0], texts, probes=100)
    latencies = sorted(x * 1000 for x in result["latencies"])
    p99 = latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))]
    others = ", ".join(f"{k} {v}" for k, v in result.items() if k != "latencies")
    print(f"{len(latencies)} probes: p50 {latencies[len(latencies) // 2]:.1f} ms, p99 {p99:.1f} ms; {others}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

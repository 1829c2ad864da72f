"""`lora-rm serve`: a reward model behind HTTP (FastAPI + uvicorn, the optional `serve` extra).

    POST /get_reward  {"query": [text, ...]}                   -> {"rewards": [...], "scores": [...]}
    POST /score       {"prompts": [...], "responses": [...]}   -> {"rewards": [...]}
    GET  /health                                               -> {"status": "ok", ...}

/get_reward is OpenRLHF's remote reward model protocol (`--remote_rm_url http://HOST:PORT/get_reward`): each
query is a full text (prompt and response joined, as the policy's tokenizer decoded it), scored as
`RewardModel.score_texts` reads it. OpenRLHF also sends "prompts" and "labels"; they are ignored. It reads
"scores" (for dynamic filtering and logs) when present, else the rewards, so both are sent, equal.

One worker task owns the model. A request queues its sequences and waits; the worker scores the oldest queued
sequences, up to `batch_size` from as many requests as fit, in one model call on a thread of its own, so
concurrent requests share forwards, the event loop keeps answering, and one model call runs at a time.
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations (Request) at runtime.
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import threading
from dataclasses import dataclass
from typing import Any

from lora_rm.batcher import Batcher
from lora_rm.checks import messages_problem, text_problem
from lora_rm.errors import UserError

MAX_BODY_BYTES = 64 * 2**20  # a request body larger than this is refused before it is parsed
log = logging.getLogger("lora_rm.serve")


def require_serve_extra() -> None:
    """Raise UserError naming the extra to install when FastAPI or uvicorn is missing."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise UserError(
            f"lora-rm serve needs FastAPI and uvicorn ({e.name or e} is not installed): "
            "pip install lora_rm[serve]"
        ) from None


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; more is answered 413 and nothing of it is scored."""

    max_request_texts: int = 4096  # texts (or rows) in one request
    max_text_chars: int = 100_000  # characters in one text (a row: its prompt and response together)

    def __post_init__(self) -> None:
        for name in ("max_request_texts", "max_text_chars"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')}: must be > 0, got {getattr(self, name)}")


class RequestError(Exception):
    """A request the server refuses: answered with `status` and {"error": message}."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _text_list(body: dict[str, Any], key: str, limits: Limits, check: Any = text_problem) -> list[Any]:
    """body[key] as a list whose every item passes `check`; RequestError (422 or 413) saying why not."""
    if key not in body:
        raise RequestError(422, f'missing field "{key}"')
    values = body[key]
    if not isinstance(values, list):
        raise RequestError(422, f'"{key}": expected a list, got {type(values).__name__}')
    if len(values) > limits.max_request_texts:
        raise RequestError(
            413, f'"{key}": {len(values)} items, more than --max-request-texts {limits.max_request_texts}'
        )
    problems = [f"{key}[{i}]: {p}" for i, v in enumerate(values) if (p := check(v))]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise RequestError(422, "; ".join(problems[:3]) + more)
    return values


def _chars(value: Any) -> int:
    return len(value) if isinstance(value, str) else sum(len(m["content"]) for m in value)


def _check_lengths(values: list[Any], limits: Limits, what: str) -> None:
    for i, v in enumerate(values):
        if _chars(v) > limits.max_text_chars:
            raise RequestError(
                413,
                f"{what}[{i}]: {_chars(v)} characters, more than --max-text-chars {limits.max_text_chars}",
            )


async def _json_body(request: Any) -> dict[str, Any]:
    size = request.headers.get("content-length", "")
    if size.isdigit() and int(size) > MAX_BODY_BYTES:
        raise RequestError(413, f"request body of {size} bytes, more than {MAX_BODY_BYTES}")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise RequestError(413, f"request body larger than {MAX_BODY_BYTES} bytes")
    try:
        data = json.loads(body)
    except ValueError as e:
        raise RequestError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise RequestError(422, f"expected a JSON object, got {type(data).__name__}")
    return data


def build_app(model: Any, batch_size: int = 32, normalize: bool = False, limits: Limits | None = None) -> Any:
    """The FastAPI app serving `model` (a RewardModel, or anything with its `score`, `score_texts` and
    `data_format`); the batching worker runs while the app's lifespan does."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    limits = limits or Limits()
    chat = model.data_format == "conversational"

    def prompt_problem(prompt: Any) -> str | None:
        if chat != isinstance(prompt, list):
            return (
                "this model was trained on chat messages: give the prompt as a list of {role, content} messages"
                if chat
                else "this model was trained on text: give the prompt as text, formatted as in training"
            )
        return messages_problem(prompt) if chat else text_problem(prompt)

    state: dict[str, Batcher] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher = state["batcher"] = Batcher(model, batch_size, normalize)
        worker = asyncio.create_task(batcher.run())
        yield
        worker.cancel()  # uvicorn has drained every request by now
        with contextlib.suppress(asyncio.CancelledError):
            await worker
        batcher.close()

    app = FastAPI(title="lora_rm reward server", lifespan=lifespan)

    @app.exception_handler(RequestError)
    async def refuse(request: Request, e: RequestError) -> JSONResponse:
        return JSONResponse({"error": str(e)}, status_code=e.status)

    async def rewards(kind: str, items: list[Any]) -> list[float]:
        try:
            return await state["batcher"].rewards(kind, items)
        except UserError as e:
            raise RequestError(422, str(e)) from None

    @app.post("/get_reward")
    async def get_reward(request: Request) -> dict[str, Any]:
        texts = _text_list(await _json_body(request), "query", limits)
        _check_lengths(texts, limits, "query")
        scores = await rewards("texts", texts)
        return {"rewards": scores, "scores": scores}

    @app.post("/score")
    async def score(request: Request) -> dict[str, Any]:
        body = await _json_body(request)
        prompts = _text_list(body, "prompts", limits, prompt_problem)
        responses = _text_list(body, "responses", limits)
        if len(prompts) != len(responses):
            raise RequestError(422, f"{len(prompts)} prompts but {len(responses)} responses")
        for i, (p, r) in enumerate(zip(prompts, responses)):
            if _chars(p) + len(r) > limits.max_text_chars:
                raise RequestError(
                    413,
                    f"row {i}: {_chars(p) + len(r)} characters of prompt and response, more than "
                    f"--max-text-chars {limits.max_text_chars}",
                )
        return {"rewards": await rewards("rows", list(zip(prompts, responses)))}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        batcher = state.get("batcher")
        return {
            "status": "ok",
            "model": str(getattr(model, "path", None)),
            "data_format": model.data_format,
            "batch_size": batch_size,
            "normalize": normalize,
            "pending_requests": batcher.pending if batcher else 0,
            "model_calls": batcher.model_calls if batcher else 0,
            "sequences_scored": batcher.sequences if batcher else 0,
        }

    return app


def listen_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (port 0: a free one); UserError when the address is taken or invalid."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
        )[0]
        # proto must say TCP: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on sockets that do, and
        # with it on every response waits ~40 ms for the client's delayed ACK.
        sock = socket.socket(family, kind, proto)
        if os.name != "nt":  # on Windows SO_REUSEADDR would let two servers share a port
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def _server_class() -> type:
    import uvicorn
    from uvicorn.server import HANDLED_SIGNALS

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            # uvicorn re-raises a caught SIGTERM after its graceful shutdown, so the process would end by
            # the signal (exit 143); a server that drained every request and stopped cleanly exits 0.
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in HANDLED_SIGNALS}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return Server


def serve(
    model: Any,
    sock: socket.socket,
    batch_size: int = 32,
    normalize: bool = False,
    limits: Limits | None = None,
) -> int:
    """Serve `model` on the bound `sock` until SIGTERM or Ctrl-C, which stop accepting connections, finish
    the requests in flight and return 0."""
    import uvicorn

    app = build_app(model, batch_size, normalize, limits)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(
        f"serving {getattr(model, 'path', 'the model')} on http://{shown}:{port} "
        "(POST /get_reward, POST /score, GET /health)",
        flush=True,
    )
    config = uvicorn.Config(app, log_level="info", access_log=False, timeout_graceful_shutdown=None)
    server = _server_class()(config)
    server.run(sockets=[sock])
    sys.stdout.flush()
    return 0 if server.started else 1

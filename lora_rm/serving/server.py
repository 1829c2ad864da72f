"""`lora-rm serve`: a reward model behind HTTP (FastAPI + uvicorn, the optional `serve` extra).

    POST /get_reward  {"query": [text, ...]}                   -> {"rewards": [...], "scores": [...]}
    POST /score       {"prompts": [...], "responses": [...]}   -> {"rewards": [...]}
    GET  /health                                               -> {"status": "ok", ...}

/get_reward is OpenRLHF's remote reward model protocol (`--remote_rm_url http://HOST:PORT/get_reward`): each
query is a full text (prompt and response joined, as the policy's tokenizer decoded it), read as OpenRLHF's own
`serve_rm` reads it where that is what the model was trained on: a text that already starts with the tokenizer's
special tokens (a template's BOS) is tokenized without adding them again, and a chat model reads every text as
a rendered chat template; any other text as `tokenizer(text)`. Control characters are text. OpenRLHF also
sends "prompts" and "labels"; they are ignored. It reads "scores" (for dynamic filtering and logs) when present,
else the rewards, so both are sent, equal.

One worker task owns the model (lora_rm.serving.batcher): requests queue their sequences, and each model call, on a
thread of its own, takes up to `batch_size` of them shared fairly among the waiting requests. What a request may
ask for and how it is checked is lora_rm.serving.request; deadlines, the connection cap, the SIGTERM drain and
the throttled logs are lora_rm.serving.guard.
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations (Request) at runtime.
import asyncio
import contextlib
import logging
import socket
import sys
from pathlib import Path
from typing import Any

from lora_rm.data.checks import messages_problem
from lora_rm.data.sequences import encode_sequences, encode_texts
from lora_rm.errors import UserError
from lora_rm.serving.batcher import Batcher, model_scorer
from lora_rm.serving.guard import (
    Guards,
    ThrottledLog,
    listen_socket,
    loopback,
    protocol_class,
    quiet_event_loop,
    quiet_logs,
    server_class,
)
from lora_rm.serving.request import (
    MAX_BODY_BYTES,
    ClientGone,
    Limits,
    RequestError,
    chars,
    check_content_type,
    check_lengths,
    check_row_lengths,
    check_token,
    check_tokens,
    read_json,
    request_models,
    served_text_problem,
    template_marker,
    text_kinds,
    token_bound,
    validate_body,
)

__all__ = ["MAX_BODY_BYTES", "Guards", "Limits", "RequestError", "build_app", "listen_socket", "serve"]
log = logging.getLogger("lora_rm.serving.server")


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


async def _cancel_when_gone(receive: Any, task: Any) -> None:
    """Cancels `task` when the client has gone (its body is read by then, so the next message is the
    disconnect)."""
    while (await receive())["type"] != "http.disconnect":
        pass
    task.cancel()


def build_app(
    model: Any,
    batch_size: int = 32,
    normalize: bool = False,
    limits: Limits | None = None,
    guards: Guards | None = None,
    throttle: ThrottledLog | None = None,
) -> Any:
    """The FastAPI app serving `model` (a RewardModel, or anything with its `score`, `score_texts` and
    `data_format`); the batching worker runs while the app's lifespan does. Every refused request is logged,
    one line with its reason (throttled)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response

    limits, guards, throttle = limits or Limits(), guards or Guards(), throttle or ThrottledLog()
    chat = model.data_format == "conversational"
    marker = template_marker(model)

    def prompt_problem(prompt: Any) -> str | None:
        if chat != isinstance(prompt, list):
            return (
                "this model was trained on chat messages: give the prompt as a list of {role, content} messages"
                if chat
                else "this model was trained on text: give the prompt as text, formatted as in training"
            )
        return messages_problem(prompt, controls=True) if chat else served_text_problem(prompt)

    reward_request, score_request = request_models(limits, prompt_problem)
    state: dict[str, Batcher] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        quiet_event_loop(throttle)
        batcher = state["batcher"] = Batcher(model_scorer(model, batch_size, normalize), batch_size)
        worker = asyncio.create_task(batcher.run())
        yield
        worker.cancel()  # uvicorn has drained every request by now
        with contextlib.suppress(asyncio.CancelledError):
            await worker
        batcher.close()

    app = FastAPI(title="lora_rm reward server", lifespan=lifespan)

    def client(request: Request) -> str:
        return f"{request.client.host}:{request.client.port}" if request.client else "a client"

    @app.exception_handler(RequestError)
    async def refuse(request: Request, e: RequestError) -> JSONResponse:
        throttle(
            f"{e.status}",
            f"refused {request.method} {request.url.path} from {client(request)}: {e.status} {e}",
        )
        return JSONResponse({"error": str(e)}, status_code=e.status, headers=e.headers)

    @app.exception_handler(ClientGone)
    async def gone(request: Request, e: ClientGone) -> Response:
        if not request.scope.get("state", {}).get("cut"):  # cut for being slow: logged already
            throttle("gone", f"{request.method} {request.url.path} from {client(request)}: client {e}")
        return Response(status_code=499)

    tokenizer, max_length = getattr(model, "tokenizer", None), getattr(model, "max_length", 0)

    def over_token_cap(lengths: list[int]) -> bool:
        """Whether a request of texts this long (characters) might pass --max-request-tokens: then its
        sequences are tokenized, as they will be scored, to count them."""
        cap = limits.max_request_tokens
        return cap is not None and token_bound(lengths, max_length) > cap

    async def sequences_of(encode: Any, *args: Any) -> list[list[int]]:
        """encode(*args) on the model's thread (it owns the tokenizer); 422 for input it refuses."""
        try:
            return await state["batcher"].on_model_thread(encode, *args)
        except UserError as e:
            raise RequestError(422, str(e)) from None

    async def body_of(request: Request) -> dict[str, Any]:
        check_token(request.headers, request.query_params, guards.token)
        check_content_type(request.headers)
        return await read_json(request)

    async def rewards(request: Request, jobs: list[tuple[str, list[Any]]]) -> list[list[float]]:
        """The rewards of each (kind, items) job; ClientGone (its unscored items dropped) when the client
        disconnects first: a watcher cancels this request's task then (one task more per request, no wait)."""
        batcher, task = state["batcher"], asyncio.current_task()
        watch = asyncio.ensure_future(_cancel_when_gone(request.receive, task))
        dropped = batcher.dropped
        try:
            if len(jobs) == 1:
                return [await batcher.rewards(*jobs[0])]
            return list(await asyncio.gather(*(batcher.rewards(k, items) for k, items in jobs)))
        except asyncio.CancelledError:
            if not watch.done() or watch.cancelled():
                raise  # cancelled by the server (a cut drain), not by the watcher
            if hasattr(task, "uncancel"):  # Python 3.11+
                task.uncancel()
            total = sum(len(items) for _, items in jobs)
            raise ClientGone(
                f"disconnected before its answer; {batcher.dropped - dropped} of {total} unscored"
            ) from None
        except UserError as e:
            raise RequestError(422, str(e)) from None
        except Exception as e:  # the model failed: one line, not a traceback per request
            throttle("model", f"scoring failed: {type(e).__name__}: {e}")
            raise RequestError(500, f"scoring failed: {type(e).__name__}: {e}") from None
        finally:
            watch.cancel()

    @app.post("/get_reward")
    async def get_reward(request: Request) -> dict[str, Any]:
        texts = validate_body(reward_request, await body_of(request)).query
        check_lengths(texts, limits, "query")
        kinds = text_kinds(texts, chat, marker)
        if over_token_cap([len(t) for t in texts]):
            ids = []
            for kind, at in kinds.items():
                chat_text = kind == "template_texts"
                ids += await sequences_of(
                    encode_texts, [texts[i] for i in at], tokenizer, max_length, chat_text
                )
            check_tokens(ids, limits, max_length)
        answers = await rewards(request, [(k, [texts[i] for i in at]) for k, at in kinds.items()])
        scores = [0.0] * len(texts)
        for at, got in zip(kinds.values(), answers):
            for i, x in zip(at, got):
                scores[i] = x
        return {"rewards": scores, "scores": scores}

    @app.post("/score")
    async def score(request: Request) -> dict[str, Any]:
        body = validate_body(score_request, await body_of(request))
        prompts, responses = body.prompts, body.responses
        check_row_lengths(prompts, responses, limits)
        if over_token_cap([chars(p) + len(r) for p, r in zip(prompts, responses)]):
            ids = await sequences_of(encode_sequences, prompts, responses, tokenizer, max_length)
            check_tokens(ids, limits, max_length)
        rows = list(zip(prompts, responses))
        return {"rewards": (await rewards(request, [("rows", rows)]))[0] if rows else []}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        batcher = state.get("batcher")
        path = getattr(model, "path", None)
        return {
            "status": "ok",
            "model": Path(path).name if path else None,  # the folder's name: no local paths to strangers
            "data_format": model.data_format,
            "batch_size": batch_size,
            "normalize": normalize,
            "pending_requests": batcher.pending if batcher else 0,
            "model_calls": batcher.model_calls if batcher else 0,
            "sequences_scored": batcher.sequences if batcher else 0,
            "sequences_dropped": batcher.dropped if batcher else 0,
        }

    return app


def serve(
    model: Any,
    sock: socket.socket,
    batch_size: int = 32,
    normalize: bool = False,
    limits: Limits | None = None,
    guards: Guards | None = None,
) -> int:
    """Serve `model` on the bound `sock` until SIGTERM or Ctrl-C, which stop accepting connections, finish the
    requests in flight (cutting those still open after `guards.drain_timeout`, and saying so) and return 0."""
    import uvicorn

    guards, throttle = guards or Guards(), ThrottledLog()
    quiet_logs(throttle)
    app = build_app(model, batch_size, normalize, limits, guards, throttle)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(
        f"serving {getattr(model, 'path', 'the model')} on http://{shown}:{port} "
        "(POST /get_reward, POST /score, GET /health)",
        flush=True,
    )
    if guards.token is None and not loopback(host):
        log.warning(
            f"{host} is reachable beyond this machine and no --token is set: anyone who reaches it can score"
        )
    config = uvicorn.Config(
        app,
        http=protocol_class(guards, throttle),
        log_level="info",
        access_log=False,
        timeout_keep_alive=guards.keep_alive_timeout,
        timeout_graceful_shutdown=guards.drain_timeout + 5,  # a backstop: the server cuts at drain_timeout
        h11_max_incomplete_event_size=32 * 1024,  # request line and headers
    )
    server = server_class(guards, throttle)(config)
    server.run(sockets=[sock])
    sys.stdout.flush()
    return 0 if server.started else 1

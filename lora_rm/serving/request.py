"""What `lora-rm serve` accepts of a request: the limits, the checks of its headers (bearer token, JSON content
type, size), its JSON body (read and parsed here, its shape checked by pydantic models), each refusal a
RequestError with the status and the reason; and how its texts are read (with the tokenizer's special tokens
added, or as a template rendered them). pydantic comes with FastAPI (the `serve` extra): imported when used."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from lora_rm.data.checks import text_problem
from lora_rm.errors import UserError

MAX_BODY_BYTES = 64 * 2**20  # a request body larger than this is refused before it is parsed


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; more is answered 413 and nothing of it is scored. A text is cut to the
    model's max_length tokens, so a request costs at most max_request_texts x max_length tokens of forward."""

    max_request_texts: int = 4096  # texts (or rows) in one request
    max_text_chars: int = 100_000  # characters in one text (a row: its prompt and response together)
    max_request_tokens: int | None = (
        None  # tokens of a request's sequences as scored (None: no cap but these)
    )

    def __post_init__(self) -> None:
        for name in ("max_request_texts", "max_text_chars", "max_request_tokens"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')}: must be > 0, got {getattr(self, name)}")


class RequestError(Exception):
    """A request the server refuses: answered with `status` and {"error": message}."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers


class ClientGone(Exception):
    """The client disconnected (or was cut for being slow) before its request was answered."""


def check_token(headers: Any, query: Any, token: str | None) -> None:
    """RequestError 401 unless `token` is None or the request carries it: `Authorization: Bearer <token>`, or
    `?token=<token>` in the URL for clients that cannot set a header (OpenRLHF's `--remote_rm_url`)."""
    if token is None:
        return
    scheme, _, given = headers.get("authorization", "").partition(" ")
    given = given.strip() if scheme.lower() == "bearer" else query.get("token", "")
    if not hmac.compare_digest(given.encode(), token.encode()):
        reason = "wrong token" if given else "missing `Authorization: Bearer <token>` header (or ?token=)"
        raise RequestError(401, reason, {"www-authenticate": "Bearer"})


def check_content_type(headers: Any) -> None:
    """RequestError 415 unless the body is declared JSON. A web page can POST text/plain or a form to any address
    without the browser asking first (no CORS preflight); it cannot send application/json that way."""
    media = headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/json":
        raise RequestError(415, f"content-type must be application/json, got {media or 'none'}")


async def read_json(request: Any) -> dict[str, Any]:
    """The request's body parsed as a JSON object (read in linear time, at most MAX_BODY_BYTES). Raises
    RequestError (400, 413, 422) for a body that is too large, not JSON, nested too deeply or not an object,
    and ClientGone when the client disconnects before sending all of it."""
    from starlette.requests import ClientDisconnect

    size = request.headers.get("content-length", "")
    if size.isdigit() and int(size) > MAX_BODY_BYTES:
        raise RequestError(413, f"request body of {size} bytes, more than {MAX_BODY_BYTES}")
    chunks, total = [], 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > MAX_BODY_BYTES:
                raise RequestError(413, f"request body larger than {MAX_BODY_BYTES} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        raise ClientGone("disconnected before sending the whole body") from None
    return parse_json(b"".join(chunks))


def parse_json(body: bytes) -> dict[str, Any]:
    """`body` as a JSON object, parsed by pydantic's parser (linear time, and it refuses nesting deeper than 200
    levels where the standard library would recurse until Python's limit); RequestError 400 (not JSON, too
    deep) or 422 (not an object)."""
    from pydantic_core import from_json

    try:
        data = from_json(body)
    except ValueError as e:
        if "recursion limit" in str(e):
            raise RequestError(400, f"request body is JSON nested too deeply ({e})") from None
        raise RequestError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise RequestError(422, f"expected a JSON object, got {type(data).__name__}")
    return data


def served_text_problem(value: Any) -> str | None:
    """Why `value` is not text the server scores: control characters are text (a policy sampling bytes writes
    them); NUL, blanks, lone surrogates and non-strings are not."""
    return text_problem(value, controls=True)


def request_models(
    limits: Limits, prompt_check: Callable[[Any], str | None] = served_text_problem
) -> tuple[Any, Any]:
    """The pydantic models of the two request bodies, for these limits: /get_reward's {"query": [text, ...]}
    and /score's {"prompts": [...], "responses": [...]} with as many of each (other fields are ignored). A field
    is a list (strictly) of at most `limits.max_request_texts` items, each passing its check: `prompt_check` for
    the prompts, `served_text_problem` for the rest. `validate_body` turns a refusal into a RequestError."""
    from pydantic import AfterValidator, Field, create_model, model_validator
    from pydantic_core import PydanticCustomError

    def items(check: Callable[[Any], str | None]) -> Any:
        def checked(value: Any) -> Any:
            if problem := check(value):
                raise PydanticCustomError("text", "{problem}", {"problem": problem})
            return value

        item = Annotated[Any, AfterValidator(checked)]
        return Annotated[list[item], Field(strict=True, max_length=limits.max_request_texts)], ...

    def as_many(body: Any) -> Any:
        if len(body.prompts) != len(body.responses):
            raise PydanticCustomError(
                "rows",
                "{problem}",
                {"problem": f"{len(body.prompts)} prompts but {len(body.responses)} responses"},
            )
        return body

    reward = create_model("RewardRequest", query=items(served_text_problem))
    score = create_model(
        "ScoreRequest",
        __validators__={"as_many": model_validator(mode="after")(as_many)},
        prompts=items(prompt_check),
        responses=items(served_text_problem),
    )
    return reward, score


def validate_body(model: Any, body: dict[str, Any]) -> Any:
    """`body` as `model` (one of `request_models`); RequestError naming the first field at fault: 422 (missing,
    not a list, bad items: the first three, or the prompts and responses not as many) or 413 (too many items)."""
    from pydantic import ValidationError

    try:
        return model.model_validate(body)
    except ValidationError as e:
        errors = e.errors(include_url=False)
    key = errors[0]["loc"][0] if errors[0]["loc"] else None
    first = errors[0]
    if key is None or first["type"] not in ("missing", "list_type", "too_long", "text"):
        raise RequestError(422, first["msg"])
    if first["type"] == "missing":
        raise RequestError(422, f'missing field "{key}"')
    if first["type"] == "list_type":
        raise RequestError(422, f'"{key}": expected a list, got {type(first["input"]).__name__}')
    if first["type"] == "too_long":
        n, most = first["ctx"]["actual_length"], first["ctx"]["max_length"]
        raise RequestError(413, f'"{key}": {n} items, more than --max-request-texts {most}')
    problems = [
        f"{key}[{x['loc'][1]}]: {x['msg']}" for x in errors if x["loc"][0] == key and x["type"] == "text"
    ]
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    raise RequestError(422, "; ".join(problems[:3]) + more)


def chars(value: Any) -> int:
    return len(value) if isinstance(value, str) else sum(len(m["content"]) for m in value)


def check_lengths(values: list[Any], limits: Limits, what: str) -> None:
    for i, v in enumerate(values):
        if chars(v) > limits.max_text_chars:
            raise RequestError(
                413,
                f"{what}[{i}]: {chars(v)} characters, more than --max-text-chars {limits.max_text_chars}",
            )


def check_row_lengths(prompts: list[Any], responses: list[str], limits: Limits) -> None:
    for i, (p, r) in enumerate(zip(prompts, responses)):
        if chars(p) + len(r) > limits.max_text_chars:
            raise RequestError(
                413,
                f"row {i}: {chars(p) + len(r)} characters of prompt and response, more than "
                f"--max-text-chars {limits.max_text_chars}",
            )


def token_bound(lengths: list[int], max_length: int) -> int:
    """At most how many tokens texts of these lengths (characters) are scored as: each is cut to max_length, and
    no tokenizer gives more than 4 tokens a character (byte fallback) plus a few special ones."""
    return sum(min(max_length, 4 * n + 4) for n in lengths)


def check_tokens(sequences: list[list[int]], limits: Limits, max_length: int) -> None:
    """RequestError 413 when the token-id sequences of a request hold more than --max-request-tokens."""
    total = sum(len(s) for s in sequences)
    if limits.max_request_tokens is not None and total > limits.max_request_tokens:
        raise RequestError(
            413,
            f"{total} tokens in {len(sequences)} sequences (each cut to max_length {max_length}), more than "
            f"--max-request-tokens {limits.max_request_tokens}",
        )


def template_marker(model: Any) -> str | None:
    """The text of the special tokens the model's tokenizer puts before a text (Llama's "<s>", BERT's "[CLS]"),
    None when it puts none. A /get_reward text that starts with it was rendered by a template that wrote them
    (OpenRLHF sends the policy's decoded tokens), so it is tokenized without adding them again."""
    from lora_rm.data.sequences import special_tokens

    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        return None
    prefix, _ = special_tokens(tokenizer)
    return "".join(tokenizer.convert_ids_to_tokens(prefix)) or None


def text_kinds(texts: list[str], chat: bool, marker: str | None) -> dict[str, list[int]]:
    """Which texts are read as rendered templates (their special tokens not added again) and which as
    `tokenizer(text)`: {kind: positions}. A chat model reads every text as its template rendered it."""
    kinds: dict[str, list[int]] = {}
    for i, text in enumerate(texts):
        kind = "template_texts" if chat or (marker and text.startswith(marker)) else "texts"
        kinds.setdefault(kind, []).append(i)
    return kinds

"""One text as token ids, the way every caller of the saved model tokenizes it, cut to a length limit.

A text is `tokenizer(text)` with the tokenizer's own special tokens (BERT's [CLS]/[SEP], Llama's BOS); a chat
rendered by its template is tokenized without adding them again (the template holds them; twice would double
BOS). Nothing is appended. Trailing pad-id tokens are dropped (when pad == EOS, a text ending in EOS):
transformers pools the rightmost token that is not the pad id, so they never carry the reward, and in a causal
model dropping them changes nothing before them. A text over the limit loses tokens from its left (its special
tokens stay) so that its end, where the reward is read, survives.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lora_rm.errors import UserError

# A text longer than this many characters per token of max_length loses characters from its left before it is
# tokenized: its kept tail is the same (the cut lies thousands of tokens before it), and a 50 MB row no longer
# costs gigabytes of token objects. No tokenizer of note has tokens this long on average.
CHARS_PER_TOKEN_CAP = 128


@dataclass
class TokenizedText:
    """One tokenized text: the tokenizer's special ids around it, the text's own ids, how many of those belong
    to the prompt (only used to report which part truncation cut), and the characters cut before tokenizing."""

    prefix: list[int]
    core: list[int]
    suffix: list[int]
    prompt_len: int = 0
    cut_chars: int = 0  # characters dropped from the left before tokenizing (a text far over max_length)


def special_tokens(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids a tokenizer itself puts before and after a text (BERT: [CLS] / [SEP]; Llama: <s> / -; GPT-2:
    - / -), found by tokenizing a probe with and without special tokens, which works for every fast tokenizer.
    """
    probe = "reward"
    core = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    start = next((i for i in range(len(full) - len(core) + 1) if full[i : i + len(core)] == core), 0)
    return list(full[:start]), list(full[start + len(core) :])


def tokenize_texts(tokenizer: Any, texts: list[str], chat: bool, max_length: int) -> list[TokenizedText]:
    """Tokenize full texts as callers of the saved model do (see the module docstring). A text far over
    `max_length` tokens is cut from the left first (`CHARS_PER_TOKEN_CAP`). Raises UserError when `max_length`
    leaves no room for text after the tokenizer's special tokens."""
    prefix, suffix = special_tokens(tokenizer)
    if max_length - len(prefix) - len(suffix) < 2:
        raise UserError(f"max_length {max_length} leaves no room for text after the special tokens")
    out = _tokenize(tokenizer, texts, chat, prefix, suffix, max_length * CHARS_PER_TOKEN_CAP + 4096)
    if any(t.cut_chars and len(t.core) <= max_length for t in out):  # tokens over 128 characters: be exact
        out = _tokenize(tokenizer, texts, chat, prefix, suffix, None)
    return out


def _tokenize(
    tokenizer: Any, texts: list[str], chat: bool, prefix: list[int], suffix: list[int], cap: int | None
) -> list[TokenizedText]:
    if not texts:
        return []
    cuts = [max(0, len(t) - cap) if cap else 0 for t in texts]
    shown = [t[c:] for t, c in zip(texts, cuts)]
    out = []
    if chat:
        bos = getattr(tokenizer, "bos_token_id", None)
        for ids, text, cut in zip(tokenizer(shown, add_special_tokens=False)["input_ids"], texts, cuts):
            if cut and bos is not None:  # the template's BOS, where the cut text lost it
                ids = tokenizer(text[:64], add_special_tokens=False)["input_ids"][:1] + ids
            keep = 1 if bos is not None and ids[:1] == [bos] else 0  # the template's BOS survives truncation
            out.append(TokenizedText(ids[:keep], ids[keep:], [], cut_chars=cut))
        return out
    for ids, cut in zip(tokenizer(shown, add_special_tokens=True)["input_ids"], cuts):
        head = prefix if ids[: len(prefix)] == prefix else []
        tail = (
            suffix if suffix and len(ids) > len(head) + len(suffix) and ids[-len(suffix) :] == suffix else []
        )
        out.append(TokenizedText(head, ids[len(head) : len(ids) - len(tail)], tail, cut_chars=cut))
    return out


def set_prompt_lens(tokenizer: Any, texts: list[TokenizedText], prompts: list[str]) -> list[TokenizedText]:
    """Record how many of each text's ids its prompt (the part of it a character cut left) gave; every
    distinct prompt is tokenized once."""
    shown = [p[t.cut_chars :] for p, t in zip(prompts, texts)]
    distinct = list(dict.fromkeys(shown))
    ids = dict(zip(distinct, tokenizer(distinct, add_special_tokens=False)["input_ids"] if distinct else []))
    for t, p in zip(texts, shown):
        t.prompt_len = common_prefix_len(ids[p], t.core)
    return texts


def fit_text(text: TokenizedText, max_length: int, pad_token_id: int | None) -> tuple[list[int], str | None]:
    """The ids of `text` within `max_length` (the text loses tokens from its left, its special tokens stay),
    without trailing pad ids, and what was cut: None, "prompt" or "response"."""
    budget = max_length - len(text.prefix) - len(text.suffix)
    cut = None
    core = text.core
    if len(core) > budget:
        drop = len(core) - budget
        core, cut = core[drop:], ("prompt" if drop <= text.prompt_len else "response")
    ids = text.prefix + core + text.suffix
    while len(ids) > 1 and ids[-1] == pad_token_id:  # never read by transformers' pooling
        ids = ids[:-1]
    return ids, cut


def over_limit(text: TokenizedText, max_length: int) -> str:
    """How many tokens `text` has when it is longer than `max_length` ("" when it fits)."""
    n = len(text.prefix) + len(text.core) + len(text.suffix)
    if text.cut_chars:
        return f"more than {n} tokens"
    return f"{n} tokens" if n > max_length else ""


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def render_chat(tokenizer: Any, messages: list[dict[str, str]], where: str) -> str:
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", None) or "this tokenizer"
        raise UserError(
            f"{where}: chosen: a list of chat messages needs a tokenizer with a chat template to render "
            f"it, and {name} has none; use a chat model's tokenizer, or give prompt, chosen and rejected as text"
        )
    return tokenizer.apply_chat_template(messages, tokenize=False)


def chat_text(tokenizer: Any, prompt: list[dict[str, str]], response: Any, where: str = "sequence") -> str:
    """A chat prompt (messages) and the assistant's reply (text or messages) rendered with the chat template."""
    reply = response if isinstance(response, list) else [{"role": "assistant", "content": response}]
    return render_chat(tokenizer, list(prompt) + list(reply), where)


def encode_texts(
    texts: Sequence[str], tokenizer: Any, max_length: int, chat: bool = False
) -> list[list[int]]:
    """Token ids of full texts, each built as one side of a training pair: `tokenizer(text)` (chat: a rendered
    chat template, tokenized without adding special tokens again), cut to `max_length` from the left."""
    pad = tokenizer.pad_token_id
    return [fit_text(t, max_length, pad)[0] for t in tokenize_texts(tokenizer, list(texts), chat, max_length)]


def encode_sequences(
    prompts: Sequence[Any], responses: Sequence[Any], tokenizer: Any, max_length: int
) -> list[list[int]]:
    """Token ids of single (prompt, response) sequences, each built exactly as one side of a training pair:
    text prompts give `tokenizer(prompt + response)`; a prompt that is a list of chat messages (with the
    assistant's reply as text or messages) is rendered with the chat template. Same length policy.
    Raises UserError when text and chat prompts are mixed.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    chat = [isinstance(p, list) for p in prompts]
    if any(chat) and not all(chat):
        raise UserError("prompts mix text and chat messages: give all as text or all as message lists")
    if any(chat):
        texts = [
            chat_text(tokenizer, p, r, f"sequence {n + 1}")
            for n, (p, r) in enumerate(zip(prompts, responses))
        ]
        return encode_texts(texts, tokenizer, max_length, chat=True)
    return encode_texts([p + r for p, r in zip(prompts, responses)], tokenizer, max_length)

"""OpenRLHF's own remote reward model client, unmodified, gets the trained reward from a real `lora-rm serve`.

tests/vendor/ holds OpenRLHF's code as published (each file says from which commit, and the imports changed so
that neither ray nor deepspeed is needed): main's rollout path, which builds the prompt with the chat template
(`preprocess_data`), tokenizes it, appends the policy's tokens, decodes the whole with its special tokens and POSTs
it with aiohttp (`SingleTurnAgentExecutor`), and v0.9.0's requests client, which shards a batch across the
`--remote_rm_url` servers (`RemoteRewardModel.get_rewards`, `request_api_wrapper`). Only the policy is a stand-in:
it "generates" a given reply, ending in EOS as vLLM's token ids do.

The model: a tiny Llama trained by lora_rm on chat preferences, with a byte-level BPE tokenizer that adds BOS and
a Llama-3 template that writes it too (a rendered conversation tokenized with special tokens starts with two
BOS), and that round-trips every character as Llama-3's does, control characters included. Each reward the
client gets equals `RewardModel.score` of the conversation (fp32, 1e-4): a server that added BOS again, or refused
ESC, form feed or U+0092, fails here.
"""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace

import pytest
import torch
from conftest import BAD, GOOD, PROMPTS, WORDS, integration, tiny_run_config, write_jsonl

from lora_rm.evaluation.reward_model import RewardModel

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("aiohttp")
pytest.importorskip("requests")

from test_serve import Server  # noqa: E402  (after the skips: it needs httpx, fastapi and uvicorn)
from vendor import ray_standin  # noqa: E402
from vendor.openrlhf_agent import SingleTurnAgentExecutor  # noqa: E402
from vendor.openrlhf_prompts_dataset import preprocess_data  # noqa: E402
from vendor.openrlhf_remote_rm_utils import RemoteRewardModel  # noqa: E402

ATOL = 1e-4
TOKEN = "s3cret-Token"  # OpenRLHF sends no headers: the token travels in the URL (docs/serving.md)
BOS, EOS = "<|begin_of_text|>", "<|eot_id|>"
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def _user(text: str) -> str:
    return text.replace("question : ", "")


PLAIN = [  # each prompt once (the stand-in policy knows its reply by the prompt), good and bad replies
    (_user(p) + suffix, reply)
    for p, suffix, reply in zip(PROMPTS * 2, [""] * 4 + [" thanks"] * 4, GOOD + BAD + GOOD[:2])
]
CONTROL = [  # ESC (a terminal colour), form feed, U+0092 (C1), DEL and NEL, in the prompt and in the reply
    (_user(PROMPTS[0]) + " \x1b[1m", "\x0csure first mix \x92 then heat \x1b[0m"),
    ("how do i\x0cfix bike ?", "figure it out yourself\x7f \x85"),
    ("learn python \x92 ?", GOOD[1] + " \x1b]0;title\x07"),
]


def _tokenizer():
    """Llama-3 style: byte-level BPE (every character round-trips through decode), BOS added to every text,
    a template that writes BOS, EOS == pad == <|eot_id|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", BOS, "<|start_header_id|>", "<|end_header_id|>", EOS]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([" ".join(WORDS), *PROMPTS, *GOOD, *BAD, "user assistant"] * 3, trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 1)])
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=EOS, unk_token="<unk>",
        model_max_length=128, clean_up_tokenization_spaces=False,
    )  # fmt: skip
    out.chat_template = LLAMA3_TEMPLATE
    return out


@pytest.fixture(scope="module")
@integration
def trained(tmp_path_factory):
    """A tiny Llama with the tokenizer above, trained by lora_rm on chat preferences (~10 s)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora_rm.training.loop import train

    tmp = tmp_path_factory.mktemp("openrlhf")
    tok = _tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=128, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    base = tmp / "base"
    LlamaForCausalLM(config).save_pretrained(base)
    tok.save_pretrained(base)
    rows = [
        {
            "prompt": [{"role": "user", "content": _user(PROMPTS[i % len(PROMPTS)])}],
            "chosen": [{"role": "assistant", "content": GOOD[i % len(GOOD)]}],
            "rejected": [{"role": "assistant", "content": BAD[(i // 3) % len(BAD)]}],
        }
        for i in range(48)
    ]
    data = write_jsonl(tmp / "prefs.jsonl", rows)
    result = train(tiny_run_config(base, data, tmp / "run", epochs=2), log=lambda *_: None)
    return result.adapter_dir


@pytest.fixture(scope="module")
def rm(trained) -> RewardModel:
    return RewardModel.from_pretrained(trained, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def url(trained, tmp_path_factory):
    """/get_reward of a real `lora-rm serve` process, with the token in the URL as OpenRLHF users give it."""
    log = tmp_path_factory.mktemp("openrlhf-serve") / "serve.log"
    server = Server(trained, log, "--dtype", "fp32", "--token", TOKEN, "--batch-size", "4")
    try:
        yield f"{server.wait_ready().url}/get_reward?token={TOKEN}"
    finally:
        server.stop()


def _trained_rewards(rm: RewardModel, conversations) -> torch.Tensor:
    prompts = [[{"role": "user", "content": user}] for user, _ in conversations]
    return torch.tensor(rm.score(prompts, [reply for _, reply in conversations]))


class Policy:
    """Stands in for OpenRLHF's vLLM rollout actor (`generate(prompt_token_ids, sampling_params,
    multi_modal_data)`): it answers the prompt it is given with the reply set for it, its tokens ending in EOS
    as vLLM's do."""

    def __init__(self, tokenizer, replies: dict[str, str]):
        self.tokenizer, self.replies = tokenizer, replies

    async def generate(self, prompt_token_ids, sampling_params, multi_modal_data=None):
        prompt = self.tokenizer.decode(prompt_token_ids, skip_special_tokens=False)
        reply = self.replies[prompt]
        ids = self.tokenizer(reply + EOS, add_special_tokens=False)["input_ids"]
        return SimpleNamespace(
            outputs=[SimpleNamespace(token_ids=ids, text=reply, finish_reason="stop", logprobs=None)]
        )


def _rollouts(url: str, tokenizer, conversations) -> list[dict]:
    """OpenRLHF main's single-turn rollouts of `conversations` (user text, policy reply), all at once as its
    vLLM actor runs them: the dataset row through `preprocess_data` (the chat template, with the generation
    prompt), the executor's tokenization, generation, decoding and its aiohttp request to the reward server."""
    executor = SingleTurnAgentExecutor(url)
    prompts = [
        preprocess_data(
            {"input": [{"role": "user", "content": user}], "label": ""},
            input_key="input",
            label_key="label",
            apply_chat_template=tokenizer.apply_chat_template,
        )[0]
        for user, _ in conversations
    ]
    policy = Policy(tokenizer, {p: reply for p, (_, reply) in zip(prompts, conversations)})

    async def run() -> list[dict]:
        params = SimpleNamespace(max_tokens=None, logprobs=None)
        return await asyncio.gather(
            *(executor.execute(p, "", params, 128, tokenizer, policy) for p in prompts)
        )

    return asyncio.run(run())


@pytest.mark.parametrize("conversations", [PLAIN, CONTROL], ids=["chat-template", "control-characters"])
def test_openrlhf_rollouts_get_the_trained_reward(url, rm, conversations, caplog):
    tokenizer = rm.tokenizer
    with caplog.at_level(logging.INFO):
        outputs = _rollouts(url, tokenizer, conversations)
    for out, (user, reply) in zip(outputs, conversations):
        sent = tokenizer.decode(out["observation_tokens"], skip_special_tokens=False)
        # what OpenRLHF sent: the conversation as its template renders it, one BOS (written by the template),
        # the control characters as they were
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        assert sent == tokenizer.apply_chat_template(messages, tokenize=False), sent
        assert sent.startswith(BOS) and not sent.startswith(BOS * 2)
    got = [out["reward"] for out in outputs]
    assert None not in got, f"OpenRLHF got no reward: {caplog.text}"
    # each request held one query, so each reward is the response's one-item list, as with OpenRLHF's own
    # serve_rm (its samples generator makes torch.tensor([reward]) of it)
    assert all(isinstance(r, list) and len(r) == 1 for r in got), got
    torch.testing.assert_close(
        torch.tensor(got).flatten(), _trained_rewards(rm, conversations), rtol=0, atol=ATOL
    )
    assert [out["scores"] for out in outputs] == got  # what OpenRLHF filters and logs on


def _queries(tokenizer, conversations) -> list[str]:
    """The texts OpenRLHF's experience maker decodes from prompt + response tokens (skip_special_tokens=False)."""
    ids = []
    for user, reply in conversations:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )
        ids.append(
            tokenizer(prompt, add_special_tokens=False)["input_ids"]
            + tokenizer(reply + EOS, add_special_tokens=False)["input_ids"]
        )
    return tokenizer.batch_decode(ids, skip_special_tokens=False)


def test_openrlhf_batched_clients_across_two_servers_get_the_trained_reward(url, rm):
    """A batch sharded across two `--remote_rm_url` entries (the same server twice), by main's aiohttp client
    and by v0.9.0's requests client; one query over two servers sends the second an empty batch."""
    conversations = PLAIN + CONTROL
    queries = _queries(rm.tokenizer, conversations)
    expected = _trained_rewards(rm, conversations)
    prompts, labels = [q[:10] for q in queries], [""] * len(queries)

    main = SingleTurnAgentExecutor([url, url])
    answers = asyncio.run(main._fetch_rewards_via_http(queries, prompts, labels))
    assert len(answers) == 2 and all(a["scores"] == a["rewards"] for a in answers)
    torch.testing.assert_close(
        torch.cat([torch.as_tensor(a["rewards"]) for a in answers]), expected, rtol=0, atol=ATOL
    )

    old = RemoteRewardModel.remote(SimpleNamespace(micro_rollout_batch_size=4), [url, url])
    answers = ray_standin.get(old.get_rewards.remote(queries, prompts, labels))
    # as v0.9.0's update_samples_with_rewards reads them
    torch.testing.assert_close(
        torch.cat([torch.as_tensor(a["rewards"]) for a in answers]), expected, rtol=0, atol=ATOL
    )
    answers = ray_standin.get(old.get_rewards.remote(queries[:1], prompts[:1], labels[:1]))
    assert answers[1] == {"rewards": [], "scores": []}
    torch.testing.assert_close(torch.as_tensor(answers[0]["rewards"]), expected[:1], rtol=0, atol=ATOL)

"""lora_rm.model.engine: every scoring path gives the plain reading (`AutoModelForSequenceClassification` on the merged
model, right-padded) within 1e-4 in fp32, for GPT-2 (pad == EOS), a tokenizer that adds BOS, a distinct pad, a
chat template and an encoder (plain rows); and the layout's pieces against hand-worked tensors."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import WORDS, caller_base, integration

import lora_rm
from lora_rm.data.encode import EncodedPair
from lora_rm.data.sequences import encode_sequences
from lora_rm.evaluation.evaluate import full_evaluation
from lora_rm.evaluation.reward_model import RewardModel
from lora_rm.model.engine import Throughput, score_sequences
from lora_rm.model.precision import scoring_dtype
from lora_rm.model.rows import build_rows, cut_batches, group_by_prefix, make_units, pack_rows

ATOL = 1e-4
TARGETS = {"gpt2": ["c_attn"], "distinct_pad": ["c_attn"], "bert": ["query", "value"]}
VERBS = ["make a cake", "cook rice", "fix bike", "learn python", "mix", "heat", "stir", "check the"]


def _save_adapter(base_dir, out, kind: str):
    """A random (nonzero) LoRA + head on `base_dir`, saved as an adapter folder, and the merged model beside it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    torch.manual_seed(1)
    base = AutoModelForSequenceClassification.from_pretrained(
        base_dir,
        num_labels=1,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
    )
    config = LoraConfig(
        task_type="SEQ_CLS", r=4, lora_alpha=8, init_lora_weights=False,
        target_modules=TARGETS.get(kind, ["q_proj", "v_proj"]),
    )  # fmt: skip
    model = get_peft_model(base, config)
    model.save_pretrained(out / "adapter")
    tok.save_pretrained(out / "adapter")
    model.merge_and_unload().save_pretrained(out / "merged")
    tok.save_pretrained(out / "merged")
    return out


@pytest.fixture(scope="module", params=["gpt2", "llama_bos", "distinct_pad", "chat", "bert"])
@integration
def saved(request, tmp_path_factory, tiny_bert):
    kind = request.param
    tmp = tmp_path_factory.mktemp(f"engine-{kind}")
    base = tiny_bert if kind == "bert" else caller_base(tmp / "base", kind)
    return kind, _save_adapter(base, tmp, kind)


def _at_limit(kind: str, tokenizer) -> str:
    """A prompt whose sequence (with the response " it is easy") is exactly 64 tokens."""
    for n in range(20, 64):
        prompt = "question : " + " ".join(["mix"] * n)
        chat = [[{"role": "user", "content": prompt}]] if kind == "chat" else [prompt]
        if len(encode_sequences(chat, [" it is easy"], tokenizer, 1000)[0]) == 64:
            return prompt
    raise AssertionError("no prompt of 64 tokens")


def _workload(kind: str, tokenizer, seed: int = 0) -> tuple[list, list]:
    """Prompts in groups of 1 to 16, shuffled (a prompt's rows out of order), with duplicate and empty
    completions, mixed lengths, one sequence at max_length (64 tokens) and two over it."""
    rng = random.Random(seed)
    prompts, responses = [], []
    for size in [1, 2, 3, 5, 8, 16]:
        prompt = f"question : how do i {rng.choice(VERBS)} {rng.choice(VERBS)} ? answer :"
        for i in range(size):
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 20)))
            prompts.append(prompt)
            responses.append(" " + words if i % 4 else (responses[-1] if i else ""))  # duplicates and ""
    at_limit = _at_limit(kind, tokenizer)
    prompts += [at_limit, at_limit, at_limit, " ".join(["question : how do i cook rice ?"] * 12)]
    responses += [
        "",
        " it is easy",
        " it is easy thanks",
        " sure first you should " + " ".join(["stir"] * 60),
    ]
    order = list(range(len(prompts)))
    rng.shuffle(order)
    prompts, responses = [prompts[i] for i in order], [responses[i] for i in order]
    if kind == "chat":
        prompts = [[{"role": "user", "content": p}] for p in prompts]
    return prompts, responses


def _plain(merged, seqs: list[list[int]], pad: int) -> torch.Tensor:
    """The plain reading: transformers' own model and pooling, on right-padded rows, in one forward."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(merged).eval()
    width = max(len(s) for s in seqs)
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits[:, 0].float()


@pytest.fixture(scope="module")
def scored(saved):
    kind, folder = saved
    logs: list[str] = []
    rm = RewardModel.from_pretrained(folder / "adapter", device="cpu", dtype=torch.float32, log=logs.append)
    prompts, responses = _workload(kind, rm.tokenizer)
    seqs = encode_sequences(prompts, responses, rm.tokenizer, rm.max_length)
    # one at the limit, two cut to it from over it (a chat's trailing <|im_end|> is its pad id: dropped)
    assert rm.max_length == 64 and max(len(s) for s in seqs) == 64 - (kind == "chat")
    assert sum(len(s) == 64 - (kind == "chat") for s in seqs) == 3
    # the layout probe runs once per model; read once here so its verdict lands in `logs` whatever order the
    # tests of this module run in (the others score `rm.model` with their own, silent log)
    rm.score(prompts, responses)
    return (
        kind,
        folder,
        rm,
        prompts,
        responses,
        seqs,
        _plain(folder / "merged", seqs, rm.tokenizer.pad_token_id),
        logs,
    )


def _close(got, expected, what: str) -> None:
    torch.testing.assert_close(torch.as_tensor(got).float(), expected, rtol=0, atol=ATOL, msg=what)


def test_score_and_compare_give_the_plain_reading(scored):
    kind, _, rm, prompts, responses, seqs, plain, logs = scored
    assert not any(type(m).__name__.startswith("Lora") for m in rm.model.modules())  # merged at load
    _close(rm.score(prompts, responses), plain, "score")
    _close(rm.score(prompts, responses, max_tokens_per_batch=70), plain, "score, 70 tokens a forward")
    _close(rm.score(prompts, responses, batch_size=1), plain, "score, budget of one row")
    i, j = [n for n, p in enumerate(prompts) if p == prompts[-1]][:2]
    result = rm.compare(prompts[i], responses[i], responses[j])
    _close([result["reward_a"], result["reward_b"]], plain[[i, j]], "compare")
    plain_rows = any("plain rows" in line for line in logs)
    assert plain_rows == (kind == "bert"), logs  # the encoder reads plain rows, with one log line
    assert sum("plain rows" in line for line in logs) <= 1


def test_texts_reward_function_and_full_evaluation_give_the_plain_reading(scored):
    kind, _, rm, prompts, responses, seqs, plain, _ = scored
    tok = rm.tokenizer
    texts = [tok.decode(s, skip_special_tokens=False) for s in seqs]
    if kind in ("gpt2", "distinct_pad"):  # these tokenizers add nothing: the decoded text tokenizes back
        _close(rm.score_texts(texts), plain, "score_texts")
    fn = lora_rm.reward_function(rm, max_tokens_per_batch=200)
    _close(fn(prompts, responses, completion_ids=None), plain, "reward_function")
    pairs = [EncodedPair(seqs[i], seqs[i + 1]) for i in range(0, len(seqs) - 1, 2)]
    _, r_c, r_r = full_evaluation(rm.model, pairs, tok.pad_token_id, batch_size=4, log=lambda *_: None)
    _close(r_c, plain[0 : 2 * len(pairs) : 2], "full evaluation, chosen")
    _close(r_r, plain[1 : 2 * len(pairs) : 2], "full evaluation, rejected")


def test_engine_with_and_without_keys_and_in_plain_rows(scored):
    kind, _, rm, prompts, _, seqs, plain, _ = scored
    pad = rm.tokenizer.pad_token_id
    keys = [str(p) for p in prompts]
    for options in (
        {},
        {"keys": keys},
        {"packed": False},
        {"keys": keys, "max_tokens": 64, "row_tokens": 64},
    ):
        _close(score_sequences(rm.model, seqs, pad, log=lambda *_: None, **options), plain, str(options))


def test_bf16_within_bf16_rounding(scored):
    kind, folder, _, prompts, responses, seqs, plain, _ = scored
    logs: list[str] = []
    rm = RewardModel.from_pretrained(folder / "adapter", device="cpu", dtype="bf16", log=logs.append)
    assert next(rm.model.parameters()).dtype == torch.bfloat16
    got = torch.tensor(rm.score(prompts, responses))
    assert logs[0].startswith("scoring: bfloat16 (asked for), merged weights, device cpu")
    assert any("plain rows" in line for line in logs) == (kind == "bert"), logs  # bf16 passes the probe
    plain_bf16 = score_sequences(rm.model, seqs, rm.tokenizer.pad_token_id, packed=False)
    # bf16 keeps 8 significant bits: the engine is as close to fp32 as bf16's plain reading is, up to rounding
    bound = 2 * float((plain_bf16 - plain).abs().max()) + 2**-7 * float(plain.abs().max())
    assert float((got - plain).abs().max()) <= bound


def test_scoring_dtype_choice(monkeypatch):
    cpu = torch.device("cpu")
    assert scoring_dtype(cpu, "fp32") == (torch.float32, "asked for")
    assert scoring_dtype(cpu, torch.bfloat16)[0] == torch.bfloat16
    monkeypatch.setenv("LORA_RM_SCORE_DTYPE", "bf16")
    assert scoring_dtype(cpu)[0] == torch.bfloat16
    monkeypatch.setenv("LORA_RM_SCORE_DTYPE", "auto")
    fast = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert scoring_dtype(cpu) == (
        (torch.bfloat16, "auto: this CPU has AVX512-BF16/AMX")
        if fast
        else (torch.float32, scoring_dtype(cpu)[1])
    )
    assert scoring_dtype(cpu, quant="8bit")[0] == torch.float32
    with pytest.raises(lora_rm.UserError, match="dtype"):
        scoring_dtype(cpu, "int3")


# the layout's pieces, by hand


def test_groups_by_shared_tokens():
    seqs = [[1, 2, 3, 4], [9, 8], [1, 2, 3, 5, 6], [1, 2, 7], [9, 8, 7]]
    assert group_by_prefix(seqs) == [[0, 2, 3], [1, 4]]
    assert group_by_prefix([[1], [2], [3]]) == [[0], [1], [2]]  # nothing shared: one unit each


def test_units_rows_and_the_mask_by_hand():
    seqs = [[5, 6, 7], [5, 6, 8, 9], [5, 6], [3]]  # a group of three sharing [5, 6], and one alone
    units = make_units(seqs, [[0, 1, 2], [3]], row_tokens=16)
    assert [(u.prefix, u.members) for u in units] == [(2, [0, 1, 2]), (1, [3])]
    rows = pack_rows(seqs, units, row_tokens=16)
    assert len(rows) == 1
    built = build_rows(seqs, rows, pad_token_id=0)
    ids, mask, pos, index, members = (
        built.input_ids,
        built.mask,
        built.position_ids,
        built.index,
        built.members,
    )
    assert ids.tolist() == [[5, 6, 7, 8, 9, 3]]
    assert pos.tolist() == [[0, 1, 2, 2, 3, 0]]
    assert members == [0, 1, 2, 3] and index.tolist() == [2, 4, 1, 5]  # seq 2 is the prefix: read at its end
    assert mask[0, 0].int().tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 0, 1, 0, 0],  # the second suffix sees the prefix, not the first suffix
        [1, 1, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],  # another unit sees only itself
    ]
    assert [(u.prefix, u.members) for u in make_units(seqs, [[0, 1, 2]], row_tokens=4)] == [
        (3, [0]),
        (2, [1, 2]),
    ]  # a group over the row is split, each part with the prefix its members share


def test_batches_cut_by_a_token_budget():
    assert cut_batches([10, 40, 20, 30], max_tokens=60) == [[1], [3, 2], [0]]
    assert cut_batches([100, 5], max_tokens=50) == [[0], [1]]  # a row over the budget goes alone


def test_an_empty_sequence_is_refused(tiny_gpt2):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_gpt2), num_labels=1, pad_token_id=0)
    with pytest.raises(ValueError, match="empty"):
        score_sequences(model, [[1, 2], []], 0)
    assert score_sequences(model, [], 0).shape == (0,)


def test_a_model_that_ignores_the_4d_mask_reads_plain_rows(tiny_gpt2):
    from transformers import GPT2ForSequenceClassification

    class IgnoresMask(GPT2ForSequenceClassification):
        def forward(self, input_ids=None, attention_mask=None, **kwargs):
            if attention_mask is not None and attention_mask.dim() == 4:
                attention_mask = None  # plain causal attention over the whole packed row
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    torch.manual_seed(0)
    model = IgnoresMask.from_pretrained(str(tiny_gpt2), num_labels=1, pad_token_id=0).eval()
    seqs = [[5, 6, 7, 8], [5, 6, 9], [5, 6, 10, 11, 12], [13, 14]]
    logs: list[str] = []
    got = score_sequences(model, seqs, 0, keys=["a", "a", "a", "b"], log=logs.append)
    assert len(logs) == 1 and "plain rows" in logs[0]
    _close(got, score_sequences(model, seqs, 0, packed=False), "plain rows")
    score_sequences(model, seqs, 0, log=logs.append)
    assert len(logs) == 1  # probed once per model


def test_the_throughput_line_counts_in_words_that_agree():
    assert Throughput([[1, 2]]).line().startswith("scored 1 sequence (2 tokens) in ")
    line = Throughput([[1, 2], [3]]).line("read")
    assert line.startswith("read 2 sequences (3 tokens) in ") and " sequences/s, " in line

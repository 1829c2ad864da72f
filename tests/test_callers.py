"""One reward, everywhere: the model lora_rm saves gives, in every caller a user plugs it into, the reward lora_rm
trained, evaluated and scores (within 1e-4, fp32).

Callers: lora_rm's RewardModel (adapter and merged), `lora-rm serve` (/get_reward and /score),
`AutoModelForSequenceClassification` (one text, and a right-padded batch), `pipeline("text-classification")`,
`PeftModel` on the recorded base from another working directory, PEFT's `AutoPeftModelForSequenceClassification`,
and TRL's `GRPOTrainer` reward computation (the saved model as a reward model, and `lora_rm.reward_function`).
Tokenizers: GPT-2 (pad == EOS, trained on an 8-bit base, the default path), a Llama-style one that adds BOS, one
with a distinct pad token, a chat-template model, and a chat model whose tokenizer adds BOS and whose template
writes it (Llama-3 style). The other way round, an adapter trained by TRL's RewardTrainer is read by lora_rm
exactly as transformers reads it.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from conftest import (
    BAD,
    GOOD,
    PROMPTS,
    caller_base,
    caller_tokenizer,
    integration,
    preference_rows,
    tiny_run_config,
    write_jsonl,
)

import lora_rm
from lora_rm.errors import UserError
from lora_rm.evaluation.reward_model import RewardModel

ATOL = 1e-4


def _chat_rows(n: int) -> list[dict]:
    return [
        {
            "prompt": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)].replace("question : ", "")}],
            "chosen": [{"role": "assistant", "content": GOOD[i % len(GOOD)]}],
            "rejected": [{"role": "assistant", "content": BAD[(i // 3) % len(BAD)]}],
        }
        for i in range(n)
    ]


KINDS = ["gpt2", "llama_bos", "distinct_pad", "chat", "chat_bos"]


@pytest.fixture(scope="module", params=KINDS)
@integration
def run(request, tmp_path_factory):
    """A base of one tokenizer kind, trained by lora_rm with a merged model; the base is given as a path
    relative to the working directory, as a user types it."""
    from lora_rm.training.loop import train

    kind = request.param
    tmp = tmp_path_factory.mktemp(f"callers-{kind}")
    base = caller_base(tmp / "bases" / kind, kind)
    rows = _chat_rows(48) if kind.startswith("chat") else preference_rows(48)
    data = write_jsonl(tmp / "prefs.jsonl", rows)
    quant = "8bit" if kind == "gpt2" else "none"  # GPT-2 on the default 8-bit path
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp / "bases")  # the base is given as a path relative to here
        cfg = tiny_run_config(kind, data, tmp / "run", quant=quant, epochs=2, merge=True)
        result = train(cfg, log=lambda *_: None)
    prompts = [r["prompt"] for r in rows[:6]]
    responses = [r["chosen"] if i % 2 else r["rejected"] for i, r in enumerate(rows[:6])]
    if not kind.startswith(
        "chat"
    ):  # a response ending in the EOS text: transformers never reads a trailing pad id
        responses[0] = responses[0] + caller_tokenizer(kind).eos_token
    else:
        responses = [r[0]["content"] for r in responses]
    rm = RewardModel.from_pretrained(result.adapter_dir, device="cpu", dtype=torch.float32)
    return {
        "kind": kind,
        "base": base,
        "result": result,
        "rm": rm,
        "prompts": prompts,
        "responses": responses,
        "reference": torch.tensor(rm.score(prompts, responses)),
        "tmp": tmp,
    }


def _texts(run) -> list[str]:
    """The texts as others see them: prompt + response, or the chat rendered with the template."""
    tok = run["rm"].tokenizer
    if run["kind"].startswith("chat"):
        return [
            tok.apply_chat_template(p + [{"role": "assistant", "content": r}], tokenize=False)
            for p, r in zip(run["prompts"], run["responses"])
        ]
    return [p + r for p, r in zip(run["prompts"], run["responses"])]


def _encode(tokenizer, texts, kind, **kwargs):
    # a rendered chat template holds its special tokens already (TRL and lora_rm tokenize it without adding them)
    return tokenizer(texts, add_special_tokens=not kind.startswith("chat"), return_tensors="pt", **kwargs)


def _close(got, run, what: str) -> None:
    torch.testing.assert_close(
        torch.as_tensor(got, dtype=torch.float32).flatten(), run["reference"], rtol=0, atol=ATOL, msg=what
    )


def test_the_reference_is_what_training_evaluated(run):
    # the eval lora_rm reports at the end of training is computed with these very rewards
    assert run["result"].eval_metrics["n_pairs"] == 12
    saved = json.loads((run["result"].adapter_dir / "lora_rm_config.json").read_text(encoding="utf-8"))
    assert saved["sequence_format"] == 2
    assert run["reference"].std() > 0


def test_merged_model_through_lora_rm_transformers_and_pipeline(run):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    merged = run["result"].merged_dir
    _close(
        RewardModel.from_pretrained(merged, device="cpu").score(run["prompts"], run["responses"]),
        run,
        "merged",
    )
    model = AutoModelForSequenceClassification.from_pretrained(merged).eval()
    tok = AutoTokenizer.from_pretrained(merged)
    texts = _texts(run)
    with torch.no_grad():
        one_by_one = [model(**_encode(tok, [t], run["kind"])).logits[0, 0] for t in texts]
        batch = _encode(tok, texts, run["kind"], padding=True)
        assert tok.padding_side == "right" and bool((batch["attention_mask"] == 0).any())
        padded = model(**batch).logits[:, 0]
    _close(torch.stack(one_by_one), run, "transformers, one text")
    _close(padded, run, "transformers, right-padded batch")
    if not run["kind"].startswith(
        "chat"
    ):  # pipeline tokenizes with special tokens: for chat text it would add them again
        pipe = pipeline("text-classification", model=str(merged), function_to_apply="none", device="cpu")
        _close([o["score"] for o in pipe(texts, batch_size=4)], run, "pipeline")


def test_adapter_through_peft_from_another_working_directory(run, tmp_path, monkeypatch):
    from peft import AutoPeftModelForSequenceClassification, PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    adapter = run["result"].adapter_dir
    recorded = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))[
        "base_model_name_or_path"
    ]
    assert Path(recorded).is_absolute() and Path(recorded) == run["base"].resolve()
    assert json.loads((adapter / "lora_rm_config.json").read_text(encoding="utf-8"))["base"] == recorded
    monkeypatch.chdir(tmp_path)  # where the relative base path given in training means nothing
    tok = AutoTokenizer.from_pretrained(adapter)
    texts = _encode(tok, _texts(run), run["kind"], padding=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GPT-2: PEFT's fan_in_fan_out note, for an adapter trained on int8
        base = AutoModelForSequenceClassification.from_pretrained(
            recorded, num_labels=1, pad_token_id=tok.pad_token_id
        )
        peft_model = PeftModel.from_pretrained(base, adapter).eval()
        auto = AutoPeftModelForSequenceClassification.from_pretrained(
            adapter, num_labels=1, pad_token_id=tok.pad_token_id
        ).eval()
    with torch.no_grad():
        _close(peft_model(**texts).logits[:, 0], run, "PeftModel on the recorded base")
        _close(auto(**texts).logits[:, 0], run, "AutoPeftModelForSequenceClassification")
    _close(
        RewardModel.from_pretrained(adapter, device="cpu").score(run["prompts"], run["responses"]), run, "cwd"
    )


def _grpo_rewards(run, tmp_path, reward_funcs):
    """Rewards as TRL's GRPOTrainer computes them (its own `_calculate_rewards`), one column per function."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    prompts, responses = run["prompts"], run["responses"]
    completions = (
        [[{"role": "assistant", "content": r}] for r in responses]
        if run["kind"].startswith("chat")
        else responses
    )
    args = GRPOConfig(
        output_dir=str(tmp_path / "grpo"),
        per_device_train_batch_size=2,
        num_generations=2,
        max_completion_length=4,
        report_to=[],
        use_cpu=True,
        bf16=False,
        logging_steps=1,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = GRPOTrainer(
            model=str(run["base"]),
            reward_funcs=reward_funcs,
            args=args,
            train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
        )
    inputs = [{"prompt": p, "completion": c} for p, c in zip(prompts, completions)]
    ids = [run["rm"].tokenizer(r, add_special_tokens=False)["input_ids"] for r in responses]
    return trainer._calculate_rewards(inputs, prompts, completions, ids).cpu()


def test_trl_grpo_gets_the_trained_reward(run, tmp_path):
    rewards = _grpo_rewards(
        run, tmp_path, [str(run["result"].merged_dir), lora_rm.reward_function(run["rm"], batch_size=4)]
    )
    _close(rewards[:, 1], run, "GRPOTrainer with lora_rm.reward_function")
    if run["kind"] == "llama_bos":
        # TRL tokenizes plain prompt + completion with add_special_tokens=False, so a reward model it loads
        # itself never sees the BOS that tokenizer(text), pipeline and training put first: pass
        # lora_rm.reward_function instead (README, "Use it elsewhere")
        assert not torch.allclose(rewards[:, 0], run["reference"], atol=ATOL)
    else:
        _close(rewards[:, 0], run, "GRPOTrainer with the merged model as reward model")


def test_reward_function_signature_and_normalization(run):
    fn = lora_rm.reward_function(run["rm"])
    assert fn.__name__ == "lora_rm_reward"
    prompts = run["prompts"]
    completions = (
        [[{"role": "assistant", "content": r}] for r in run["responses"]]
        if run["kind"].startswith("chat")
        else run["responses"]
    )
    got = fn(
        prompts=prompts, completions=completions, completion_ids=None, trainer_state=None, answer=["x"] * 6
    )
    _close(got, run, "reward_function")
    if run["rm"].reward_stats:
        mean, std = run["rm"].reward_stats["mean"], run["rm"].reward_stats["std"]
        normalized = lora_rm.reward_function(run["rm"], normalize=True)(prompts, completions)
        torch.testing.assert_close(
            torch.tensor(normalized), (run["reference"] - mean) / std, atol=ATOL, rtol=0
        )
    with pytest.raises(ValueError, match="6 prompts but 5 completions"):
        fn(prompts, completions[:5])


def test_serve_gives_the_trained_reward_to_openrlhf_and_score(run):
    # /get_reward reads what OpenRLHF sends: the chat template rendered as text (chat_bos: BOS included, so it
    # must not be added again), or prompt + response, also as a policy decodes it with its BOS in front
    from fastapi.testclient import TestClient

    from lora_rm.serving.server import build_app

    bos = run["rm"].tokenizer.bos_token if not run["kind"].startswith("chat") else None
    with TestClient(build_app(run["rm"], batch_size=4)) as http:
        r = http.post("/get_reward", json={"query": _texts(run)})
        _close(r.json()["rewards"], run, "serve /get_reward")
        if bos:
            r = http.post("/get_reward", json={"query": [bos + t for t in _texts(run)]})
            _close(r.json()["rewards"], run, "serve /get_reward, texts decoded with their BOS")
        r = http.post("/score", json={"prompts": run["prompts"], "responses": run["responses"]})
        _close(r.json()["rewards"], run, "serve /score")


def test_models_saved_under_the_old_rule_are_refused(trained_run, tmp_path):
    import shutil

    for name in ("adapter", "merged"):
        old = shutil.copytree(getattr(trained_run, f"{name}_dir"), tmp_path / name)
        config = json.loads((old / "lora_rm_config.json").read_text(encoding="utf-8"))
        del config["sequence_format"]
        (old / "lora_rm_config.json").write_text(json.dumps(config), encoding="utf-8")
        with pytest.raises(UserError, match="older lora_rm that read the reward at an EOS"):
            RewardModel.from_pretrained(old)
        with pytest.raises(UserError, match="older lora_rm"):
            lora_rm.load_reward_model(old) if name == "adapter" else lora_rm.reward_function(old)


@pytest.mark.integration
def test_an_adapter_trained_by_trl_is_read_as_transformers_reads_it(tiny_gpt2, tmp_path):
    from datasets import Dataset
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    tok = AutoTokenizer.from_pretrained(tiny_gpt2)
    tok.pad_token = tok.eos_token
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        tiny_gpt2, num_labels=1, pad_token_id=tok.pad_token_id
    )
    rows = preference_rows(16)
    args = RewardConfig(
        output_dir=str(tmp_path / "trl"),
        per_device_train_batch_size=4,
        max_steps=4,
        learning_rate=5e-3,
        report_to=[],
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        save_strategy="no",
        logging_steps=1,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = RewardTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tok,
            peft_config=LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["c_attn"]),
        )
        trainer.train()
    out = tmp_path / "trl-adapter"
    trainer.save_model(str(out))
    assert (out / "adapter_config.json").is_file() and not (out / "lora_rm_config.json").exists()
    prompts, responses = [r["prompt"] for r in rows[:6]], [r["chosen"] for r in rows[:6]]
    base = AutoModelForSequenceClassification.from_pretrained(
        tiny_gpt2, num_labels=1, pad_token_id=tok.pad_token_id
    )
    reference = PeftModel.from_pretrained(base, out).eval()
    batch = tok([p + r for p, r in zip(prompts, responses)], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = reference(**batch).logits[:, 0]
    got = RewardModel.from_pretrained(out, device="cpu").score(prompts, responses, batch_size=4)
    torch.testing.assert_close(torch.tensor(got), expected, rtol=0, atol=ATOL)


def test_the_package_never_imports_trl():
    # TRL is a test dependency (the dev extra): lora_rm's reward function only has TRL's signature
    root = Path(lora_rm.__file__).parent
    assert not [
        p.name for p in root.glob("*.py") if re.search(r"^\s*(from|import) trl\b", p.read_text(), re.M)
    ]

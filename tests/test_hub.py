"""lora_rm.training.hub: the model card, the upload (against a fake HfApi: no network), and failed pushes."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
from conftest import GOOD, PROMPTS

from lora_rm.cli import main
from lora_rm.errors import UserError
from lora_rm.training.hub import push_to_hub, render_model_card

RUN_CONFIG = {
    "base": "gpt2",
    "dataset": "prefs.jsonl",
    "split": "train",
    "data_format": "explicit",
    "eval_fraction": 0.05,
    "lora_r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.05,
    "quant": "8bit",
    "max_length": 1024,
    "batch_size": 4,
    "gradient_accumulation_steps": 4,
    "learning_rate": 1e-4,
    "lr_scheduler": "cosine",
    "warmup_ratio": 0.05,
    "total_steps": 150,
    "mixed_precision": "bf16",
    "seed": 42,
}
METRICS = {"loss": 0.1161, "accuracy": 0.955, "ties": 0, "mean_margin": 3.354, "n_pairs": 200}


def _python_blocks(card: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", card, re.DOTALL)


def test_card_has_front_matter_settings_metrics_and_usage():
    card = render_model_card(RUN_CONFIG, METRICS, "me/rm", merged=False)
    front = card.split("---")[1]
    assert "library_name: peft" in front and "base_model: gpt2" in front
    assert all(f"- {tag}" in front for tag in ("reward-model", "lora", "rlhf"))
    assert "| accuracy | 0.9550 |" in card and "| n_pairs | 200 |" in card and "| loss | 0.1161 |" in card
    assert "| LoRA r / alpha / dropout | 16 / 32 / 0.05 |" in card and "4 x 4 accumulation steps" in card
    assert "`prefs.jsonl`" in card
    lora_rm_usage, plain_usage = _python_blocks(card)
    assert (
        'snapshot_download("me/rm")' in lora_rm_usage and "RewardModel.from_pretrained(path)" in lora_rm_usage
    )
    assert "load_reward_model(path)" in lora_rm_usage
    assert 'PeftModel.from_pretrained(base, "me/rm")' in plain_usage
    assert 'from_pretrained("gpt2", num_labels=1, pad_token_id=tokenizer.pad_token_id)' in plain_usage
    assert "eos_token" not in plain_usage  # the text as it is: nothing appended
    assert "merged" not in plain_usage


def test_card_for_a_local_base_and_a_merged_model(tmp_path):
    card = render_model_card(
        {**RUN_CONFIG, "base": str(tmp_path), "data_format": "conversational"}, {}, "me/rm", merged=True
    )
    assert "base_model" not in card.split("---")[1]  # the hub refuses a base_model that is not a hub id
    assert "a local folder when trained" in card and "No evaluation was run" in card
    lora_rm_usage, plain_usage = _python_blocks(card)
    assert '/merged")' in lora_rm_usage and 'subfolder="merged"' in plain_usage
    assert (
        "apply_chat_template(m, tokenize=False)" in plain_usage and "add_special_tokens=False" in plain_usage
    )


def test_training_writes_the_card_and_its_snippets_run(trained_run, tmp_path, monkeypatch):
    card = (trained_run.adapter_dir / "README.md").read_text(encoding="utf-8")
    assert (
        "library_name: peft" in card and f"| accuracy | {trained_run.eval_metrics['accuracy']:.4f} |" in card
    )
    assert "| ece |" in card  # from the full evaluation in eval/eval.json
    # The repo as push_to_hub lays it out: the adapter at the root, the merged model in merged/
    repo = tmp_path / "repo"
    shutil.copytree(trained_run.adapter_dir, repo)
    shutil.copytree(trained_run.merged_dir, repo / "merged")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id: str(repo))
    lora_rm_usage, plain_usage = (b.replace("YOUR_NAME/YOUR_REPO", str(repo)) for b in _python_blocks(card))
    exec(lora_rm_usage, {})
    # the plain snippet's reward equals lora_rm's, which builds the sequence as training did
    prompt, response = PROMPTS[0], " " + GOOD[0]
    namespace: dict = {}
    snippet = plain_usage.replace('"Question: Hi?\\nAnswer:" + " Hello!"', repr(prompt + response))
    assert snippet != plain_usage
    exec(snippet, namespace)
    from lora_rm.evaluation.reward_model import RewardModel

    expected = RewardModel.from_pretrained(repo, device="cpu").score([prompt], [response])[0]
    assert namespace["rewards"][0] == pytest.approx(expected, abs=1e-4)


class FakeApi:
    calls: list = []
    fail_with: Exception | None = None

    def __init__(self, token=None):
        self.calls.append(("init", token))

    def create_repo(self, repo_id, private=None, exist_ok=False):
        self.calls.append(("create_repo", repo_id, private, exist_ok))
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, repo_id, folder_path, path_in_repo=None, commit_message=None):
        if self.fail_with:
            raise self.fail_with
        self.calls.append(("upload_folder", repo_id, Path(folder_path).name, path_in_repo))


@pytest.fixture
def online(monkeypatch):
    """The hub switched on, a token in the environment, HfApi replaced by FakeApi."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_fake_token")
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    FakeApi.calls, FakeApi.fail_with = [], None
    return FakeApi


def _run_dir(trained_run, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(trained_run.adapter_dir, out / "adapter")
    shutil.copytree(trained_run.merged_dir, out / "merged")
    return out


def test_push_uploads_adapter_and_merged(trained_run, tmp_path, online):
    url = push_to_hub(_run_dir(trained_run, tmp_path), "me/rm", private=True)
    assert url == "https://huggingface.co/me/rm"
    assert online.calls == [
        ("init", "hf_fake_token"),
        ("create_repo", "me/rm", True, True),
        ("upload_folder", "me/rm", "adapter", None),
        ("upload_folder", "me/rm", "merged", "merged"),
    ]


def test_push_failures_keep_the_local_output(trained_run, tmp_path, online, monkeypatch):
    out = _run_dir(trained_run, tmp_path)
    online.fail_with = ConnectionError("connection refused")
    with pytest.raises(UserError, match="cannot reach the Hugging Face Hub") as e:
        push_to_hub(out, "me/rm")
    assert (
        f"The local output is intact: adapter in {out / 'adapter'}, merged model in {out / 'merged'}"
        in str(e.value)
    )
    assert "push_to_hub(" in str(e.value)  # how to retry without training again
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(UserError, match="no token; set HF_TOKEN or run `hf auth login`"):
        push_to_hub(out, "me/rm")


def _train_argv(tiny_gpt2, prefs_file, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        f"--base={tiny_gpt2}",
        f"--dataset={prefs_file}",
        f"--output-dir={out}",
        "--quant=none",
        "--precision=fp32",
        "--max-steps=2",
        "--batch-size=4",
        "--gradient-accumulation-steps=1",
        "--eval-fraction=0.25",
        *extra,
    ]


@pytest.mark.integration
def test_cli_offline_push_exits_2_and_keeps_the_adapter(tiny_gpt2, prefs_file, tmp_path, capsys):
    out = tmp_path / "run"  # HF_HUB_OFFLINE=1 comes from conftest
    assert main(_train_argv(tiny_gpt2, prefs_file, out, "--push-to-hub=me/rm")) == 2
    err = capsys.readouterr().err
    assert "error: could not push to the hub repo me/rm: HF_HUB_OFFLINE=1 is set" in err
    assert f"The local output is intact: adapter in {out / 'adapter'}" in err and "Traceback" not in err
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert "library_name: peft" in (out / "adapter" / "README.md").read_text(encoding="utf-8")


@pytest.mark.integration
def test_cli_refused_token_exits_2(tiny_gpt2, prefs_file, tmp_path, capsys, online):
    response = SimpleNamespace(status_code=401, headers={}, request=None)
    refused = huggingface_hub.errors.HfHubHTTPError("401 Unauthorized", response=response)
    online.fail_with = refused
    out = tmp_path / "run"
    assert main(_train_argv(tiny_gpt2, prefs_file, out, "--push-to-hub=me/rm", "--private")) == 2
    err = capsys.readouterr().err
    assert "the hub refused the token (HTTP 401)" in err and "The local output is intact" in err
    assert ("create_repo", "me/rm", True, True) in online.calls
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_bad_repo_id_is_refused_before_training(tiny_gpt2, prefs_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_train_argv(tiny_gpt2, prefs_file, out, "--push-to-hub=not a/valid//id")) == 2
    assert "push_to_hub: 'not a/valid//id' is not a hub repo id" in capsys.readouterr().err
    assert not out.exists()


def test_the_card_template_is_package_data():
    """The card is rendered from lora_rm/training/model_card.md, which a wheel carries only when pyproject names it, and
    huggingface_hub reads its front matter back."""
    from importlib.resources import files

    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text(encoding="utf-8")
    assert (files("lora_rm.training") / "model_card.md").is_file()
    assert re.search(
        r'\[tool\.setuptools\.package-data\]\s*\n"lora_rm\.training" = \["model_card\.md"\]', pyproject
    )
    data = huggingface_hub.ModelCard(render_model_card(RUN_CONFIG, METRICS, "me/rm", merged=False)).data
    assert (data.library_name, data.base_model, data.pipeline_tag) == ("peft", "gpt2", "text-classification")
    assert data.tags == ["reward-model", "lora", "rlhf", "lora_rm"]

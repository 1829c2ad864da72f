"""Publish a trained reward model: a model card in adapter/README.md, and an upload to the Hugging Face Hub."""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path
from typing import Any

from lora_rm.config import repo_id_problems
from lora_rm.errors import UserError
from lora_rm.util.atomic import write_text_atomic

PLACEHOLDER_REPO = "YOUR_NAME/YOUR_REPO"
METRIC_ORDER = ("accuracy", "loss", "ties", "mean_margin", "ece", "top1_accuracy", "n_pairs")


def _is_hub_id(name: str) -> bool:
    return bool(name) and not repo_id_problems(name) and not Path(name).expanduser().exists()


def render_model_card(
    run_config: dict[str, Any],
    eval_metrics: dict[str, Any],
    repo_id: str,
    merged: bool,
) -> str:
    """README.md for the adapter folder and the hub repo: huggingface_hub's ModelCard rendered from the Jinja
    template lora_rm/training/model_card.md, with YAML front matter (library_name peft, base_model when the base is a hub
    id, tags), what it is, base, data, settings, eval metrics and usage snippets.
    The reward of a text is what `AutoModelForSequenceClassification` gives for `tokenizer(prompt + response)`
    (a chat: the template rendered to text, tokenized without adding special tokens), so the snippets need no
    caveat; they are run by the tests.
    """
    from huggingface_hub import ModelCard, ModelCardData

    base = str(run_config.get("base"))
    repo = repo_id or PLACEHOLDER_REPO
    hub_base = _is_hub_id(base)
    targets = ", ".join(run_config.get("target_modules") or []) or "PEFT's default for the architecture"
    settings = [
        ("LoRA r / alpha / dropout", f"{run_config.get('lora_r')} / {run_config.get('lora_alpha')} / {run_config.get('lora_dropout')}"),
        ("target modules", targets),
        ("base weights in training", run_config.get("quant")),
        ("max length (tokens)", run_config.get("max_length")),
        ("pairs per step", f"{run_config.get('batch_size')} x {run_config.get('gradient_accumulation_steps')} accumulation steps"),
        ("learning rate", f"{run_config.get('learning_rate')} ({run_config.get('lr_scheduler')}, warmup {run_config.get('warmup_ratio')})"),
        ("optimizer steps", run_config.get("total_steps", run_config.get("max_steps"))),
        ("loss", run_config.get("loss", "pairwise")),
        ("precision", {"no": "fp32"}.get(run_config.get("mixed_precision"), run_config.get("mixed_precision"))),
        ("seed", run_config.get("seed")),
    ]  # fmt: skip
    scalars = {
        k: v for k, v in eval_metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    ordered = [k for k in METRIC_ORDER if k in scalars] + sorted(set(scalars) - set(METRIC_ORDER))
    metric_rows = [(k, f"{scalars[k]:.4f}" if isinstance(scalars[k], float) else scalars[k]) for k in ordered]
    eval_source = run_config.get("eval_dataset") or (
        f"{run_config.get('eval_fraction')} of the data held out (or the dataset's test split)"
    )
    if run_config.get("eval_model"):
        eval_source += f", read from {run_config['eval_model']}"
    card_data = ModelCardData(
        library_name="peft",
        base_model=base if hub_base else None,
        pipeline_tag="text-classification",
        tags=["reward-model", "lora", "rlhf", "lora_rm"],
    )
    card = ModelCard.from_template(
        card_data,
        template_path=str(files("lora_rm.training") / "model_card.md"),
        name=repo.split("/")[-1],
        repo=repo,
        base=base,
        hub_base=hub_base,
        merged=merged,
        chat=run_config.get("data_format") == "conversational",
        quant=run_config.get("quant"),
        dataset=run_config.get("dataset"),
        split=run_config.get("split", "train"),
        data_format=run_config.get("data_format", "?"),
        settings=settings,
        metrics=metric_rows,
        eval_source=eval_source,
    )
    return str(card) + "\n"  # jinja drops the template's last newline


def _offline() -> bool:
    from lora_rm.util.offline import hub_offline

    return hub_offline()


def _reason(e: Exception, repo_id: str) -> str:
    status = getattr(getattr(e, "response", None), "status_code", None)
    if status in (401, 403):
        return f"the hub refused the token (HTTP {status}): check HF_TOKEN or `hf auth login`, and write access to {repo_id}"
    kind, text = type(e).__name__, str(e).strip()
    if any(k in kind for k in ("Connect", "Timeout", "Offline", "Network")):
        return f"cannot reach the Hugging Face Hub ({kind})"
    return f"{kind}: {text.splitlines()[0] if text else ''}"


def push_to_hub(
    output_dir: str | Path,
    repo_id: str,
    private: bool = False,
    token: str | None = None,
    include_merged: bool | None = None,
) -> str:
    """Upload OUTPUT_DIR/adapter to the root of `repo_id` (created if missing) and OUTPUT_DIR/merged, when
    present (or when `include_merged`), into its merged/ folder; return the repo URL.

    The token is `token`, else HF_TOKEN, else the saved login (`hf auth login`); nothing ever prompts.
    Raises UserError, saying that the local output is intact and where, when the hub is off
    (HF_HUB_OFFLINE), there is no token, or the hub refuses or cannot be reached.
    """
    out = Path(output_dir)
    adapter, merged = out / "adapter", out / "merged"
    if not (adapter / "adapter_config.json").is_file():
        raise UserError(f"{adapter}: no adapter to push (expected a folder written by lora-rm train)")
    with_merged = merged.is_dir() if include_merged is None else include_merged and merged.is_dir()
    kept = f"The local output is intact: adapter in {adapter}" + (
        f", merged model in {merged}" if with_merged else ""
    )
    retry = f"python -c \"from lora_rm.training.hub import push_to_hub; push_to_hub('{out}', '{repo_id}')\""

    def failure(reason: str) -> UserError:
        return UserError(f"could not push to the hub repo {repo_id}: {reason}. {kept}. To retry: {retry}")

    import huggingface_hub

    if _offline():
        raise failure("HF_HUB_OFFLINE=1 is set (unset it to push)")
    token = token or huggingface_hub.get_token()
    if not token:
        raise failure("no token; set HF_TOKEN or run `hf auth login`")
    api = huggingface_hub.HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private or None, exist_ok=True)
        full_id = getattr(url, "repo_id", None) or repo_id
        api.upload_folder(
            repo_id=full_id, folder_path=adapter, commit_message="lora_rm: adapter (LoRA + reward head)"
        )
        if with_merged:
            api.upload_folder(
                repo_id=full_id,
                folder_path=merged,
                path_in_repo="merged",
                commit_message="lora_rm: merged model",
            )
    except Exception as e:  # whatever the network or the account did, the trained model must not be lost
        raise failure(_reason(e, repo_id)) from None
    return str(url)


def publish(
    output_dir: str | Path, run_config: dict[str, Any], eval_metrics: dict[str, Any], log: Any = print
) -> str | None:
    """Write the model card to OUTPUT_DIR/adapter/README.md; when run_config["push_to_hub"] names a repo,
    push (see `push_to_hub`, whose UserError this raises). Returns the repo URL or None."""
    out = Path(output_dir)
    metrics = dict(eval_metrics or {})
    report = out / "eval" / "eval.json"
    if report.is_file():  # the full evaluation adds calibration and ranking
        full = json.loads(report.read_text(encoding="utf-8"))
        metrics.setdefault("ece", (full.get("calibration") or {}).get("ece"))
        if "ranking" in full:
            metrics.setdefault("top1_accuracy", full["ranking"].get("top1_accuracy"))
    repo_id, merged = (
        run_config.get("push_to_hub"),
        bool(run_config.get("merge")) and (out / "merged").is_dir(),
    )
    card = render_model_card(run_config, metrics, repo_id or "", merged)
    write_text_atomic(out / "adapter" / "README.md", card)
    if not repo_id:
        return None
    url = push_to_hub(out, repo_id, bool(run_config.get("private")), include_merged=merged)
    log(f"pushed {out / 'adapter'}" + (f" and {out / 'merged'}" if merged else "") + f" to {url}")
    return url

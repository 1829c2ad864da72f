"""Use a trained reward model: load it, score responses, compare two, evaluate it on a dataset.

Sequences are built exactly as in training (`lora_rm.data.sequences`: `tokenizer(prompt + response)`, or the chat
template rendered to text; `max_length` from the saved `lora_rm_config.json`) and read by `compute_rewards`
at the token transformers reads, so a score here is the reward the model gave that text during training and
the one `AutoModelForSequenceClassification`, `pipeline` and TRL get from the saved model. Models from other
tools (TRL's RewardTrainer, any transformers reward model or PEFT adapter) are read the same way.
Rewards are raw (no sigmoid). `reward_function` hands the model to an RLHF loop with TRL's `reward_funcs`
signature.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from lora_rm.data.checks import check_rows, detect_format
from lora_rm.data.encode import default_max_length, encode_rows
from lora_rm.data.read import load_eval_rows
from lora_rm.data.sequences import encode_sequences, encode_texts
from lora_rm.errors import UserError
from lora_rm.evaluation.evaluate import STATS_FILE, write_full_eval
from lora_rm.model.engine import Throughput, score_sequences
from lora_rm.model.folder_checks import check_reward_stats, check_run_config
from lora_rm.model.folder_fit import check_merged_folder, check_rewards_finite, loading
from lora_rm.model.load import check_quantization, load_base_model, load_tokenizer
from lora_rm.model.precision import scoring_dtype
from lora_rm.model.saved import check_sequence_format, load_reward_model
from lora_rm.util.bounds import check_batch_size
from lora_rm.util.offline import model_folder
from lora_rm.util.paths import is_within
from lora_rm.util.quiet import quiet_by_default


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class RewardModel:
    """A trained reward model ready to score text: the model (eval mode), its tokenizer, the training's
    `max_length` and data format, and the reward statistics saved with it (None if there are none).

    Every method scores through `lora_rm.model.engine.score_sequences`: rows sharing a prompt are read once, short ones
    packed, batches cut by `max_tokens_per_batch` tokens (default: batch_size x max_length). `log` gets the
    engine's one line when the model needs plain rows, and the throughput of a scoring command."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        max_length: int,
        data_format: str = "explicit",
        reward_stats: dict[str, Any] | None = None,
        path: Path | None = None,
        max_tokens_per_batch: int | None = None,
        log: Any = None,
    ):
        self.model, self.tokenizer, self.max_length = model.eval(), tokenizer, max_length
        self.data_format, self.reward_stats, self.path = data_format, reward_stats, path
        self.max_tokens_per_batch, self.log = max_tokens_per_batch, log or logging.getLogger("lora_rm").info

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        base: Any = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        quant: str = "none",
        max_tokens_per_batch: int | None = None,
        log: Any = None,
        allow_untrained_head: bool = False,
    ) -> RewardModel:
        """Load an adapter folder (LoRA + head; onto its recorded base, or `base`: a hub id, a path or a
        loaded `AutoModelForSequenceClassification`) or a merged model folder, local or a hub repo id.

        An adapter is merged into its unquantized base in memory (the folder is untouched), so scoring runs no
        adapter matmuls; `quant` "8bit"/"4bit" loads the base quantized instead and keeps the adapter apart (less
        memory, slower, LLM.int8 rewards shift with the batch); a loaded `base` you pass is merged into, in place.
        `device` defaults to CUDA when available, `dtype` to `scoring_dtype`'s choice, which is logged.
        Every file read is checked first: UserError, naming the file and field, for a folder that holds neither,
        a damaged file, weights that do not fit the base or config, reward statistics that are not finite with
        std > 0, no trained reward head (a plain causal LM; allowed with `allow_untrained_head`), a base
        that cannot be loaded, or a quantization this machine cannot run. Expected third-party warnings are
        dropped (`lora_rm.util.quiet.quiet_by_default`; LORA_RM_VERBOSE=1 keeps them).
        """
        quiet_by_default()
        path = model_folder(path)  # a hub id: its snapshot, or a one-line error in seconds when offline
        device = torch.device(device) if device is not None else default_device()
        dtype, why = scoring_dtype(device, dtype, quant)
        check_quantization(quant, device.type)
        check_sequence_format(path)
        if (path / "adapter_config.json").is_file():
            model, tokenizer = _load_adapter(path, base, dtype, device, quant, allow_untrained_head)
        elif (path / "config.json").is_file():
            if base is not None:
                raise UserError(f"{path}: a merged model folder; base= only applies to adapter folders")
            check_merged_folder(path, allow_untrained_head)
            with loading(path):
                tokenizer = load_tokenizer(str(path))
                model = load_base_model(str(path), tokenizer.pad_token_id, quant=quant, dtype=dtype)
            model = model if quant != "none" else model.to(device)
        else:
            raise UserError(
                f"{path}: neither an adapter folder (adapter_config.json) nor a merged model folder "
                "(config.json); pass the adapter/ or merged/ folder a training run wrote"
            )
        saved = check_run_config(path)
        max_length = saved.get("max_length") or default_max_length(model.config, tokenizer)
        stats = check_reward_stats(path)
        rm = cls(model, tokenizer, int(max_length), saved.get("data_format", "explicit"), stats, path)
        rm.max_tokens_per_batch, rm.log = max_tokens_per_batch, log or rm.log
        weights = f"{quant} base + adapter" if quant != "none" else "merged weights"
        rm.log(f"scoring: {str(dtype).removeprefix('torch.')} ({why}), {weights}, device {device}")
        return rm

    def _normalizer(self) -> tuple[float, float]:
        stats = self.reward_stats
        if not stats or not stats.get("std"):
            where = self.path or "this model"
            raise UserError(
                f"{where}: no reward statistics ({STATS_FILE}) to normalise with; they are written at the end "
                f"of training when there is eval data, or by "
                f"`lora-rm eval --model {where} --dataset DATA --output-dir DIR --update-stats`"
            )
        return float(stats["mean"]), float(stats["std"])

    def score(
        self,
        prompts: Sequence[Any],
        responses: Sequence[Any],
        batch_size: int = 16,
        normalize: bool = False,
        progress: bool = False,
        max_tokens_per_batch: int | None = None,
    ) -> list[float]:
        """Raw reward of each (prompt, response), in order; with `normalize`, (reward - mean) / std of the
        stored eval rewards (UserError if none are stored). Prompts and responses are text (the reward of
        `tokenizer(prompt + response)`), or message lists and the assistant's reply (text or messages) rendered
        with the chat template. Responses to one prompt are read in one shared-prefix row. `progress` shows a
        tqdm bar and logs the throughput; `max_tokens_per_batch` (default: the model's, else batch_size x
        max_length) bounds the tokens of one forward."""
        if isinstance(prompts, str) or isinstance(responses, str):
            raise TypeError("prompts and responses are lists: score([prompt], [response]) for one")
        check_batch_size(batch_size)
        mean, std = self._normalizer() if normalize else (0.0, 1.0)
        seqs = encode_sequences(prompts, responses, self.tokenizer, self.max_length)
        keys = [p if isinstance(p, str) else json.dumps(p, sort_keys=True) for p in prompts]
        return self._rewards(seqs, keys, batch_size, progress, mean, std, max_tokens_per_batch)

    def _rewards(
        self,
        seqs: list[list[int]],
        keys: list[str] | None,
        batch_size: int,
        progress: bool,
        mean: float,
        std: float,
        max_tokens: int | None,
    ) -> list[float]:
        from tqdm.auto import tqdm

        budget = max_tokens or self.max_tokens_per_batch or batch_size * self.max_length
        speed = Throughput(seqs)
        # disable=None: a bar on a terminal only, never carriage-return frames in a log file
        with tqdm(total=len(seqs), desc="score", unit="seq", disable=None if progress else True) as bar:
            rewards = score_sequences(
                self.model, seqs, self.tokenizer.pad_token_id, keys, budget, progress=bar.update, log=self.log
            )
        check_rewards_finite(rewards, self.path)
        if progress:
            self.log(speed.line())
        return [(r - mean) / std for r in rewards.tolist()]

    def score_texts(
        self,
        texts: Sequence[str],
        batch_size: int = 16,
        normalize: bool = False,
        progress: bool = False,
        chat: bool = False,
        max_tokens_per_batch: int | None = None,
    ) -> list[float]:
        """Raw reward of each full text (prompt and response already joined) as `AutoModelForSequenceClassification`
        reads `tokenizer(text)`; `chat=True` for text that is a rendered chat template (tokenized without adding
        special tokens again, as TRL does); texts that start alike share their common tokens' row; `normalize`,
        `progress` and `max_tokens_per_batch` as in `score`."""
        if isinstance(texts, str):
            raise TypeError("texts is a list: score_texts([text]) for one")
        check_batch_size(batch_size)
        mean, std = self._normalizer() if normalize else (0.0, 1.0)
        seqs = encode_texts(texts, self.tokenizer, self.max_length, chat=chat)
        return self._rewards(seqs, None, batch_size, progress, mean, std, max_tokens_per_batch)

    def compare(self, prompt: Any, a: Any, b: Any) -> dict[str, float]:
        """Rewards of two responses to one prompt and the Bradley-Terry probability that `a` is preferred,
        sigmoid(r_a - r_b): {"p_a_preferred", "reward_a", "reward_b"}."""
        r_a, r_b = self.score([prompt, prompt], [a, b])
        p = 0.5 * (1.0 + math.tanh(0.5 * (r_a - r_b)))  # sigmoid without overflow; tanh is exactly odd
        return {"p_a_preferred": p, "reward_a": r_a, "reward_b": r_b}

    def evaluate(
        self,
        dataset: str,
        output_dir: str | Path,
        split: str | None = None,
        batch_size: int = 16,
        skip_invalid: bool = False,
        save_stats: bool = True,
        log: Any = print,
        max_tokens_per_batch: int | None = None,
    ) -> dict[str, Any]:
        """Full evaluation on `dataset` (any format training accepts, every row of `split` used; by default
        the dataset's test split where it has one, else its train split; the split read is logged): eval.json
        and PNGs in `output_dir` (training_curves.png too when the run's metrics.jsonl sits beside the model
        folder), and, with `save_stats`, reward_stats.json in the model folder. Returns the report.
        `max_tokens_per_batch` as in `score`. Raises UserError when `output_dir` is in the model folder, whose
        files it would replace."""
        check_batch_size(batch_size)
        if self.path is not None and is_within(output_dir, self.path):
            raise UserError(
                f"--output-dir {output_dir}: is in the model folder {self.path}; the evaluation goes into a "
                "folder of its own (--update-stats refreshes the model's reward_stats.json)"
            )
        rows, which = load_eval_rows(dataset, split)
        fmt = detect_format(rows, dataset)
        rows = check_rows(rows, fmt, dataset, skip_invalid, log)
        pairs, report = encode_rows(rows, fmt, self.tokenizer, self.max_length, "truncate", "all_pairs")
        log(f"data: {fmt} format, {which} of {dataset}; {report.summary()}")
        if not pairs:
            raise UserError(f"{dataset}: no pairs left after the length policy ({report.summary()})")
        metrics_jsonl = self.path.parent / "metrics.jsonl" if self.path else None
        return write_full_eval(
            self.model,
            self.tokenizer,
            pairs,
            output_dir,
            [self.path] if save_stats and self.path else [],
            metrics_jsonl,
            batch_size,
            source=dataset,
            log=log,
            max_tokens=max_tokens_per_batch or self.max_tokens_per_batch,
        )


def _load_adapter(
    path: Path, base: Any, dtype: torch.dtype, device: torch.device, quant: str, allow_untrained_head: bool
) -> tuple[Any, Any]:
    """The adapter on its base: merged into it when the base is unquantized, kept apart on an 8/4-bit base."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the base's "score.weight newly initialized": the adapter brings it
    try:
        model, tokenizer = load_reward_model(
            path,
            base=base,
            quant=quant,
            dtype=dtype,
            device=device,
            allow_untrained_head=allow_untrained_head,
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    if quant == "none":
        model = model.merge_and_unload().eval()
    return model, tokenizer


def reward_function(
    model: RewardModel | str | Path,
    batch_size: int = 16,
    normalize: bool = False,
    name: str = "lora_rm_reward",
    max_tokens_per_batch: int | None = None,
    **load_kwargs: Any,
) -> Callable[..., list[float]]:
    """A function `f(prompts, completions, **kwargs) -> list[float]` for TRL's `GRPOTrainer`/`RLOOTrainer`
    (`reward_funcs=[f]`): the reward of each completion to its prompt, as the model was trained to give it.

    `model` is a RewardModel or a folder (adapter or merged; `load_kwargs` go to `RewardModel.from_pretrained`).
    Plain prompts and completions are joined as text (`tokenizer(prompt + completion)`); conversational ones
    (lists of messages) are rendered with the tokenizer's chat template, as TRL renders them for a reward
    model. Rewards come from the scoring engine (`lora_rm.model.engine`): the completions of one prompt (a GRPO/RLOO
    group) are read in one shared-prefix row, and a forward holds at most `max_tokens_per_batch` tokens
    (default batch_size x max_length), on the model's device; `normalize` gives
    (reward - mean) / std of the stored eval rewards. Other keyword arguments (TRL passes the dataset's
    columns, `completion_ids`, `trainer_state`, ...) are ignored. ValueError for a `batch_size` that is not
    a positive integer.
    """
    check_batch_size(batch_size)  # now, not at the first batch of an RLHF run
    rm = model if isinstance(model, RewardModel) else RewardModel.from_pretrained(model, **load_kwargs)

    def reward(prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        # a (prompt, completion) pair is what `score` reads: the joined text, or the rendered chat
        return rm.score(
            list(prompts), list(completions), batch_size, normalize, max_tokens_per_batch=max_tokens_per_batch
        )

    reward.__name__ = reward.__qualname__ = name  # TRL logs each reward function under its __name__
    reward.reward_model = rm  # type: ignore[attr-defined]
    return reward

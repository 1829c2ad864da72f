"""Hand a trained reward model to an RLHF loop: a reward function with TRL's `reward_funcs` signature."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from lora_rm.bounds import check_batch_size
from lora_rm.score import RewardModel


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
    model. Rewards come from the scoring engine (`lora_rm.engine`): the completions of one prompt (a GRPO/RLOO
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

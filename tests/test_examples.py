"""Every example config under examples/ loads through the loader `lora-rm train --config` uses and gives a valid
TrainConfig. Nothing is trained here (the quickstart trains in tests/test_train.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_rm.args import config_from_args
from lora_rm.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def test_the_three_recipes_are_there():
    names = {p.name for p in EXAMPLES}
    assert {"quickstart.yaml", "smollm2_8bit.yaml", "7b_4bit_8gb.yaml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_config_is_a_valid_train_config(path):
    cfg = config_from_args(["--config", str(path)])
    assert isinstance(cfg, TrainConfig)
    assert cfg.base and cfg.dataset and cfg.output_dir


def test_the_7b_recipe_is_what_plan_sized_for_8gb():
    cfg = config_from_args(["--config", str(ROOT / "examples" / "7b_4bit_8gb.yaml")])
    assert cfg.quant == "4bit" and cfg.gradient_checkpointing and cfg.max_length == 1024
    assert cfg.batch_size == 1 and cfg.batch_size * cfg.gradient_accumulation_steps == 16


def test_the_smollm2_recipe_is_the_8bit_defaults():
    cfg = config_from_args(["--config", str(ROOT / "examples" / "smollm2_8bit.yaml")])
    defaults = TrainConfig(base="b", dataset="d")
    assert cfg.quant == "8bit"
    for name in (
        "lora_r",
        "lora_alpha",
        "batch_size",
        "gradient_accumulation_steps",
        "learning_rate",
        "seed",
    ):
        assert getattr(cfg, name) == getattr(defaults, name), name


def test_flags_override_an_example_config():
    cfg = config_from_args(["--config", str(ROOT / "examples" / "smollm2_8bit.yaml"), "--seed", "0"])
    assert cfg.seed == 0

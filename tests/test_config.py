"""TrainConfig checks, config files, and the flags generated from the config."""

from __future__ import annotations

import json

import pytest

from lora_rm.args import config_from_args, read_config_file, train_parser
from lora_rm.config import TrainConfig
from lora_rm.errors import UserError

REQUIRED = {"base": "gpt2", "dataset": "prefs.jsonl"}


def config_error(**kw) -> str:
    with pytest.raises(UserError) as e:
        TrainConfig(**{**REQUIRED, **kw})
    return str(e.value)


# ---------------------------------------------------------------- TrainConfig


def test_defaults_are_valid():
    cfg = TrainConfig(**REQUIRED)
    assert (cfg.quant, cfg.lora_r, cfg.lora_alpha, cfg.batch_size) == ("8bit", 16, 32, 4)
    assert cfg.max_length is None and cfg.target_modules is None and cfg.merge is False
    assert cfg.to_dict()["base"] == "gpt2"


def test_all_problems_in_one_error():
    msg = config_error(lora_r=0, batch_size=-1, quant="3bit")
    assert msg.startswith("Invalid configuration:")
    assert "lora_r: must be > 0, got 0" in msg
    assert "batch_size: must be > 0, got -1" in msg
    assert "quant: '3bit' is not one of 8bit, 4bit, none" in msg
    assert len(msg.splitlines()) == 4


def test_base_and_dataset_required():
    with pytest.raises(UserError) as e:
        TrainConfig()
    msg = str(e.value)
    assert "base: required" in msg
    assert "dataset: required" in msg


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("lora_alpha", 0, "lora_alpha: must be > 0, got 0"),
        ("gradient_accumulation_steps", 0, "gradient_accumulation_steps: must be > 0"),
        ("epochs", -2, "epochs: must be > 0, got -2"),
        ("eval_steps", 0, "eval_steps: must be > 0"),
        ("logging_steps", 0, "logging_steps: must be > 0"),
        ("max_steps", 0, "max_steps: must be > 0, got 0"),
        ("max_length", 3, "max_length: must be at least 4, got 3"),
        ("learning_rate", 0.0, "learning_rate: must be in (0, 1], got 0.0"),
        ("learning_rate", -1e-4, "learning_rate: must be in (0, 1], got -0.0001"),
        ("learning_rate", float("nan"), "learning_rate: must be a finite number, got nan"),
        ("learning_rate", "inf", "learning_rate: must be a finite number, got inf"),
        ("head_learning_rate", 0, "head_learning_rate: must be in (0, 1], got 0.0"),
        ("head_learning_rate", "nan", "head_learning_rate: must be a finite number, got nan"),
        ("weight_decay", -1, "weight_decay: must be >= 0, got -1.0"),
        ("max_grad_norm", -0.5, "max_grad_norm: must be >= 0 (0 disables clipping), got -0.5"),
        ("center_rewards_coefficient", float("inf"), "center_rewards_coefficient: must be a finite number"),
        ("lora_dropout", float("nan"), "lora_dropout: must be a finite number, got nan"),
        ("seed", -1, "seed: must be in [0, 2**32), got -1"),
        ("seed", 2**32, "seed: must be in [0, 2**32), got 4294967296"),
        ("epochs", float("inf"), "epochs: expected an integer, got inf"),
        ("eval_fraction", 1.0, "eval_fraction: must be in [0, 1), got 1.0"),
        ("eval_fraction", -0.1, "eval_fraction: must be in [0, 1)"),
        ("warmup_ratio", 1.5, "warmup_ratio: must be in [0, 1)"),
        ("lora_dropout", 1.0, "lora_dropout: must be in [0, 1)"),
        ("precision", "fp8", "precision: 'fp8' is not one of auto, bf16, fp16, fp32"),
        ("lr_scheduler", "step", "lr_scheduler: 'step' is not one of cosine, linear, constant"),
        ("optimizer", "sgd", "optimizer: 'sgd' is not one of adamw, paged_adamw_8bit"),
        ("save_steps", 0, "save_steps: must be > 0, got 0"),
        ("save_total_limit", 0, "save_total_limit: must be > 0, got 0"),
        ("max_bad_steps", -1, "max_bad_steps: must be > 0, got -1"),
        ("length_policy", "drop", "length_policy: 'drop' is not one of truncate, error"),
    ],
)
def test_each_check(field, value, expected):
    assert expected in config_error(**{field: value})


@pytest.mark.parametrize(
    "kw",
    [
        {"max_steps": 1},
        {"max_length": 4},
        {"eval_fraction": 0.0},
        {"warmup_ratio": 0.0},
        {"lora_dropout": 0.0},
        {"quant": "none", "precision": "fp32", "lr_scheduler": "constant"},
        {"quant": "4bit", "optimizer": "paged_adamw_8bit"},
    ],
)
def test_boundary_values_accepted(kw):
    TrainConfig(**REQUIRED, **kw)


# ---------------------------------------------------------------- config files


def test_read_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "base: gpt2\ndataset: d.jsonl\nlora_r: 8\nlearning_rate: 2.0e-4\nmerge: true\n"
        "target_modules: [c_attn, c_proj]\n",
        encoding="utf-8",
    )
    assert read_config_file(path) == {
        "base": "gpt2",
        "dataset": "d.jsonl",
        "lora_r": 8,
        "learning_rate": 2.0e-4,
        "merge": True,
        "target_modules": ["c_attn", "c_proj"],
    }


def test_read_json(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"base": "gpt2", "lora-r": 4, "learning_rate": 1e-4}), encoding="utf-8")
    assert read_config_file(path) == {"base": "gpt2", "lora_r": 4, "learning_rate": 1e-4}


def test_dashes_accepted(tmp_path):
    path = tmp_path / "c.yml"
    path.write_text("lora-r: 8\ngradient-accumulation-steps: 2\noutput-dir: out\n", encoding="utf-8")
    assert read_config_file(path) == {"lora_r": 8, "gradient_accumulation_steps": 2, "output_dir": "out"}


def test_empty_yaml_is_no_options(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("# nothing here\n", encoding="utf-8")
    assert read_config_file(path) == {}


def test_unknown_keys_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("base: gpt2\nlora_rank: 8\nlearning-rate: 1.0e-4\nbatchsize: 2\n", encoding="utf-8")
    with pytest.raises(UserError) as e:
        read_config_file(path)
    msg = str(e.value)
    assert str(path) in msg
    assert "unknown option(s): batchsize, lora_rank" in msg


def test_invalid_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("base: gpt2\n  lora_r: [8\n", encoding="utf-8")
    with pytest.raises(UserError, match="not valid YAML") as e:
        read_config_file(path)
    assert str(path) in str(e.value)


def test_invalid_json(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"base": "gpt2",}', encoding="utf-8")
    with pytest.raises(UserError, match="not valid JSON"):
        read_config_file(path)


def test_config_must_be_a_mapping(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("- base\n- gpt2\n", encoding="utf-8")
    with pytest.raises(UserError, match="expected a mapping of option: value, got list"):
        read_config_file(path)


def test_missing_config_file(tmp_path):
    path = tmp_path / "missing.yaml"
    with pytest.raises(UserError, match="cannot read config file") as e:
        read_config_file(path)
    assert str(path) in str(e.value)


def test_yaml_exponent_without_dot_is_a_float(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 1e-4\nweight_decay: 1e-2\n", encoding="utf-8")
    cfg = TrainConfig(**REQUIRED, **read_config_file(path))
    assert cfg.learning_rate == 1e-4
    assert cfg.weight_decay == 1e-2


def test_wrong_type_in_config_file_is_a_user_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("batch_size: four\n", encoding="utf-8")
    with pytest.raises(UserError, match="batch_size"):
        TrainConfig(**REQUIRED, **read_config_file(path))


# ---------------------------------------------------------------- flags


def test_flags_build_a_config():
    cfg = config_from_args(
        [
            "--base",
            "gpt2",
            "--dataset",
            "d.jsonl",
            "--lora-r",
            "8",
            "--learning-rate",
            "3e-4",
            "--max-length",
            "128",
        ]
    )
    assert (cfg.base, cfg.dataset, cfg.lora_r, cfg.learning_rate, cfg.max_length) == (
        "gpt2",
        "d.jsonl",
        8,
        3e-4,
        128,
    )
    assert isinstance(cfg.learning_rate, float) and isinstance(cfg.max_length, int)


def test_flags_override_config_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("base: gpt2\ndataset: d.jsonl\nlora_r: 8\nbatch_size: 2\nmerge: true\n", encoding="utf-8")
    cfg = config_from_args(["--config", str(path), "--lora-r", "4", "--dataset", "other.jsonl", "--no-merge"])
    assert cfg.lora_r == 4
    assert cfg.dataset == "other.jsonl"
    assert cfg.merge is False
    assert cfg.batch_size == 2  # from the file
    assert cfg.base == "gpt2"


def test_config_file_alone(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"base": "gpt2", "dataset": "d.jsonl", "epochs": 3}), encoding="utf-8")
    cfg = config_from_args(["--config", str(path)])
    assert cfg.epochs == 3
    assert cfg.lora_r == 16  # the dataclass default where neither file nor flag says


def test_invalid_config_via_flags_is_a_user_error():
    with pytest.raises(UserError, match="lora_r: must be > 0"):
        config_from_args(["--base", "gpt2", "--dataset", "d.jsonl", "--lora-r", "0"])


def test_target_modules_is_a_list():
    cfg = config_from_args(["--base", "b", "--dataset", "d", "--target-modules", "a", "b"])
    assert cfg.target_modules == ["a", "b"]
    cfg = config_from_args(["--base", "b", "--dataset", "d", "--target-modules", "c_attn"])
    assert cfg.target_modules == ["c_attn"]


@pytest.mark.parametrize(
    ("flags", "merge", "checkpointing"),
    [
        ([], False, False),
        (["--merge"], True, False),
        (["--no-merge"], False, False),
        (["--merge", "--gradient-checkpointing"], True, True),
        (["--merge", "--no-merge"], False, False),
    ],
)
def test_boolean_flags(flags, merge, checkpointing):
    cfg = config_from_args(["--base", "b", "--dataset", "d", *flags])
    assert cfg.merge is merge
    assert cfg.gradient_checkpointing is checkpointing


@pytest.mark.parametrize(
    ("flags", "resume"),
    [([], None), (["--resume"], "latest"), (["--resume", "runs/rm/step-000100"], "runs/rm/step-000100")],
)
def test_resume_flag_optional_value(flags, resume):
    assert config_from_args(["--base", "b", "--dataset", "d", *flags]).resume == resume


@pytest.mark.parametrize(
    "flags",
    [
        ["--lora-r", "eight"],
        ["--quant", "3bit"],
        ["--merge=maybe"],  # a switch takes true/false (HfArgumentParser style), nothing else
        ["--no-such-flag", "1"],
        ["--learning-rate", "fast"],
    ],
)
def test_bad_flags_exit_2(flags, capsys):
    with pytest.raises(SystemExit) as e:
        config_from_args(["--base", "b", "--dataset", "d", *flags])
    assert e.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_every_config_field_has_a_flag():
    parser = train_parser()
    dests = {a.dest for a in parser._actions}
    assert set(TrainConfig.__dataclass_fields__) <= dests
    options = {s for a in parser._actions for s in a.option_strings}
    assert {"--lora-r", "--output-dir", "--center-rewards-coefficient", "--no-merge", "--config"} <= options


# ---------------------------------------------------------------- TRL / TrainingArguments names


TRL_FLAGS = [
    "--model_name_or_path", "m", "--dataset_name", "d.jsonl", "--output_dir", "runs/x",
    "--per_device_train_batch_size", "3", "--num_train_epochs", "2", "--learning_rate", "5e-5",
    "--gradient_checkpointing", "--lora_target_modules", "c_attn", "c_proj", "--logging_steps", "7",
    "--save_steps", "9", "--bf16", "--lr_scheduler_type", "linear", "--dataset_train_split", "dev",
]  # fmt: skip
TRL_EXPECTED = {
    "base": "m",
    "dataset": "d.jsonl",
    "output_dir": "runs/x",
    "batch_size": 3,
    "epochs": 2,
    "learning_rate": 5e-5,
    "gradient_checkpointing": True,
    "target_modules": ["c_attn", "c_proj"],
    "logging_steps": 7,
    "save_steps": 9,
    "precision": "bf16",
    "lr_scheduler": "linear",
    "split": "dev",
}


def test_trl_names_on_the_command_line():
    cfg = config_from_args(TRL_FLAGS)
    assert {k: getattr(cfg, k) for k in TRL_EXPECTED} == TRL_EXPECTED


def test_trl_names_in_yaml(tmp_path):
    path = tmp_path / "trl.yaml"
    path.write_text(
        "model_name_or_path: m\ndataset_name: d.jsonl\noutput_dir: runs/x\nper_device_train_batch_size: 3\n"
        "num_train_epochs: 2.0\nlearning_rate: 5.0e-5\ngradient_checkpointing: true\n"
        "lora_target_modules: [c_attn, c_proj]\nlogging_steps: 7\nsave_steps: 9\nbf16: true\nfp16: false\n"
        "lr_scheduler_type: linear\ndataset_train_split: dev\n",
        encoding="utf-8",
    )
    cfg = config_from_args(["--config", str(path)])
    assert {k: getattr(cfg, k) for k in TRL_EXPECTED} == TRL_EXPECTED


TRL_MAPPED = [
    (["--load_in_8bit"], {"quant": "8bit"}),
    (["--load_in_4bit"], {"quant": "4bit"}),
    (["--load_in_4bit", "false"], {"quant": "8bit"}),
    (["--dtype", "bfloat16"], {"precision": "bf16"}),
    (["--torch_dtype", "float32"], {"precision": "fp32"}),
    (["--torch_dtype", "float16", "--bf16"], {"precision": "bf16"}),  # the switch is the compute precision
    (["--warmup_steps", "0.1"], {"warmup_ratio": 0.1}),  # transformers reads < 1 as a fraction
    (["--warmup_steps", "0"], {"warmup_ratio": 0.0}),
    (["--dataset_test_split", "dev"], {"eval_split": "dev"}),
    (["--resume_from_checkpoint"], {"resume": "latest"}),
    (["--resume_from_checkpoint", "true"], {"resume": "latest"}),
    (["--resume_from_checkpoint", "runs/x/step-000010"], {"resume": "runs/x/step-000010"}),
    (["--push_to_hub", "--hub_model_id", "me/rm"], {"push_to_hub": "me/rm"}),
    (["--push_to_hub", "true", "--output_dir", "runs/abc"], {"push_to_hub": "abc"}),
    (["--push_to_hub", "false", "--hub_model_id", "me/rm"], {"push_to_hub": None}),
    (["--hub_model_id", "me/rm"], {"push_to_hub": None}),  # as in transformers: no switch, no upload
    (["--push-to-hub", "me/x"], {"push_to_hub": "me/x"}),
    (["--optim", "adamw_torch"], {"optimizer": "adamw"}),
    (["--optim", "paged_adamw_8bit"], {"optimizer": "paged_adamw_8bit"}),
    (["--disable_dropout"], {"lora_dropout": 0.0}),  # TRL zeroes every dropout, LoRA's too
    (["--use_peft"], {"lora_r": 16}),
    (["--eval_strategy", "steps", "--eval_steps", "7"], {"eval_steps": 7}),
]


@pytest.mark.parametrize(("flags", "expected"), TRL_MAPPED)
def test_more_trl_names_map_to_options(flags, expected):
    cfg = config_from_args(["--base", "m", "--dataset", "d.jsonl", *flags])
    assert {k: getattr(cfg, k) for k in expected} == expected


TRL_REFUSED = [
    (["--per_device_eval_batch_size", "8"], "--batch-size"),
    (["--eval_strategy", "no"], "--eval-fraction 0"),
    (["--eval_strategy", "epoch"], "--eval-steps"),
    (["--warmup_steps", "50"], "--warmup-ratio"),
    (["--optim", "adafactor"], "--optimizer is adamw"),
    (["--dtype", "int8"], "--precision"),
    (["--disable_dropout", "false"], "--lora-dropout"),
    (["--use_peft", "false"], "always trains a LoRA adapter"),
    (["--load_in_8bit", "--load_in_4bit"], "both set quant"),
    (["--disable_dropout", "--lora_dropout", "0.1"], "also given as 0.1"),
    (["--push_to_hub", "me/a", "--hub_model_id", "me/b"], "name two repos"),
]


@pytest.mark.parametrize(("flags", "hint"), TRL_REFUSED)
def test_trl_names_without_an_equivalent_name_it(flags, hint):
    with pytest.raises(UserError, match="command line: |name two repos") as e:
        config_from_args(["--base", "m", "--dataset", "d.jsonl", *flags])
    assert hint in str(e.value)


def test_more_trl_names_in_yaml(tmp_path):
    path = tmp_path / "trl.yaml"
    path.write_text(
        "model_name_or_path: m\ndataset_name: d.jsonl\nload_in_4bit: true\ndtype: bfloat16\nwarmup_steps: 0.1\n"
        "push_to_hub: true\nhub_model_id: me/rm\noptim: adamw_torch\ndisable_dropout: true\nuse_peft: true\n"
        "eval_strategy: steps\ndataset_test_split: dev\nresume_from_checkpoint: true\n",
        encoding="utf-8",
    )
    cfg = config_from_args(["--config", str(path)])
    got = (cfg.quant, cfg.precision, cfg.warmup_ratio, cfg.push_to_hub, cfg.optimizer, cfg.lora_dropout)
    assert got == ("4bit", "bf16", 0.1, "me/rm", "adamw", 0.0)
    assert (cfg.eval_split, cfg.resume) == ("dev", "latest")
    path.write_text("base: m\ndataset: d.jsonl\neval_strategy: no\n", encoding="utf-8")
    with pytest.raises(UserError, match="eval_strategy: .*--eval-fraction 0"):
        config_from_args(["--config", str(path)])
    path.write_text("base: m\ndataset: d.jsonl\nper_device_eval_batch_size: 8\n", encoding="utf-8")
    with pytest.raises(UserError, match="per_device_eval_batch_size: .*--batch-size"):
        config_from_args(["--config", str(path)])


def test_eval_split_and_eval_dataset_are_one_or_the_other():
    assert "eval_split: names a split of --dataset" in config_error(eval_dataset="e.jsonl", eval_split="dev")


@pytest.mark.parametrize("flag", ["--batch_size", "--batch-size", "--per-device-train-batch-size"])
def test_every_flag_also_has_its_underscore_spelling(flag):
    assert config_from_args(["--base", "m", "--dataset", "d.jsonl", flag, "5"]).batch_size == 5
    parser = train_parser()
    for action in parser._actions:
        for option in action.option_strings:
            if option.startswith("--") and "-" in option[2:]:
                assert "--" + option[2:].replace("-", "_") in parser._option_string_actions, option


def test_switches_take_trl_style_values():
    base = ["--base", "m", "--dataset", "d.jsonl"]
    assert config_from_args([*base, "--merge", "true"]).merge is True
    assert config_from_args([*base, "--merge", "False"]).merge is False
    assert config_from_args([*base, "--no-group-by-length"]).group_by_length is False
    assert config_from_args([*base, "--fp16", "false"]).precision == "auto"
    assert config_from_args([*base, "--fp16"]).precision == "fp16"


def test_alias_conflicts_are_user_errors(tmp_path):
    path = tmp_path / "both.yaml"
    path.write_text("base: a\nmodel_name_or_path: b\ndataset: d.jsonl\n", encoding="utf-8")
    with pytest.raises(UserError, match="base and model_name_or_path both set base"):
        config_from_args(["--config", str(path)])
    path.write_text("base: a\ndataset: d.jsonl\nbf16: true\nfp16: true\n", encoding="utf-8")
    with pytest.raises(UserError, match="bf16 and fp16 both set precision"):
        config_from_args(["--config", str(path)])
    path.write_text("base: a\ndataset: d.jsonl\nbf16: yes please\n", encoding="utf-8")
    with pytest.raises(UserError, match="bf16: expected true or false"):
        config_from_args(["--config", str(path)])


@pytest.mark.parametrize("flag", ["--lr", "--learn", "--batch", "--grad"])
def test_no_abbreviations(flag, capsys):
    with pytest.raises(SystemExit) as e:
        config_from_args(["--base", "m", "--dataset", "d.jsonl", flag, "1e-4"])
    assert e.value.code == 2
    assert f"unrecognized arguments: {flag}" in capsys.readouterr().err


def test_train_help_text():
    text = " ".join(train_parser().format_help().split())  # as one line: argparse wraps at the terminal width
    assert "~30% slower" in text and "option_strings" not in text
    assert "model/data dependent" not in text and "(default: None)" not in text
    assert "--per_device_train_batch_size" in text and "--bf16" in text
    assert "--batch_size" not in text  # underscore twins work but are not listed twice

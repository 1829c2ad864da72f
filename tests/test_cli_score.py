"""`lora-rm score`, `compare` and `eval` through the real command line (cases forked as in cli_runner.py)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import cli_runner
import pytest
from cli_runner import ROOT, TRAINING_MODULES, Case
from conftest import PROMPTS, preference_rows, write_jsonl
from test_ranking import ranked_rows

from lora_rm.evaluation.reward_model import RewardModel

LORA_RM = Path(sys.executable).with_name("lora-rm")
if not LORA_RM.is_file():  # no console script (Windows: lora-rm.exe): the module it calls
    LORA_RM = ROOT / "lora_rm" / "cli.py"
GOOD, BAD = " sure first you should mix then heat", " go away"


def _score_rows(n: int) -> list[dict]:
    return [{"id": i, "prompt": PROMPTS[i % 4], "response": [GOOD, BAD][i % 2]} for i in range(n)]


@pytest.fixture(scope="module")
def setup(trained_run, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli-score")
    adapter, merged = str(trained_run.adapter_dir), tmp / "run" / "merged"
    shutil.copytree(trained_run.merged_dir, merged)  # eval must leave its reward_stats.json alone
    shutil.copy(trained_run.output_dir / "metrics.jsonl", tmp / "run" / "metrics.jsonl")
    shutil.copy(merged / "reward_stats.json", tmp / "run" / "merged-stats.json")
    bare = shutil.copytree(trained_run.adapter_dir, tmp / "bare")
    (bare / "reward_stats.json").unlink()
    bare_too = shutil.copytree(
        bare, tmp / "bare-too"
    )  # eval --update-stats writes here while score reads bare/
    good = write_jsonl(tmp / "in.jsonl", _score_rows(6))
    bad_rows = _score_rows(5)
    del bad_rows[1]["response"]
    bad_rows[2]["prompt"] = "   "
    bad_rows[3]["response"] = 7
    bad = write_jsonl(tmp / "bad.jsonl", bad_rows)
    prefs = write_jsonl(tmp / "prefs.jsonl", preference_rows(10))
    same = write_jsonl(tmp / "same.jsonl", [{"prompt": "q", "chosen": " a", "rejected": " a"}])
    ranked = write_jsonl(tmp / "ranked.jsonl", ranked_rows(4))
    (tmp / "splits").mkdir()
    write_jsonl(tmp / "splits" / "train.jsonl", preference_rows(10))
    write_jsonl(tmp / "splits" / "test.jsonl", preference_rows(3))
    o = tmp / "out"
    cases = {
        "score": ["score", "--model", adapter, "--input", str(good), "--output", str(o / "scored.jsonl")],
        "score_normalized": ["score", "--model", adapter, "--input", str(good), "--output", str(o / "n.jsonl"), "--normalize", "--batch-size", "2"],
        "score_bad_rows": ["score", "--model", adapter, "--input", str(bad), "--output", str(o / "bad.jsonl")],
        "score_no_stats": ["score", "--model", str(bare), "--input", str(good), "--output", str(o / "ns.jsonl"), "--normalize"],
        "score_no_model": ["score", "--model", str(tmp / "nope"), "--input", str(good), "--output", str(o / "nm.jsonl")],
        "compare": ["compare", "--model", adapter, "--prompt", PROMPTS[0], GOOD, BAD],
        "compare_empty": ["compare", "--model", adapter, "--prompt", PROMPTS[0], GOOD, "  "],
        "eval": ["eval", "--model", str(merged), "--dataset", str(prefs), "--output-dir", str(o / "eval")],
        "eval_ranked": ["eval", "--model", str(bare_too), "--dataset", str(ranked), "--output-dir", str(o / "eval-r"), "--update-stats"],
        "eval_splits": ["eval", "--model", adapter, "--dataset", str(tmp / "splits"), "--output-dir", str(o / "eval-s")],
        "eval_bad": ["eval", "--model", adapter, "--dataset", str(same), "--output-dir", str(o / "eval-bad")],
    }  # fmt: skip
    runs = cli_runner.start(
        {name: Case(LORA_RM, argv) for name, argv in cases.items()},
        tmp,
        preload=("lora_rm.evaluation.reward_model", *TRAINING_MODULES),
    )
    yield runs, tmp, RewardModel.from_pretrained(adapter)
    runs.stop()


def _ok(runs, name):
    r = runs.result(name)
    assert r.code == 0, f"exit {r.code}\nstdout:\n{r.out}\nstderr:\n{r.err}"
    return r


def _user_error(runs, name, *expected):
    r = runs.result(name)
    assert r.code == 2 and "Traceback" not in r.err and "error:" in r.err, f"exit {r.code}\n{r.err}"
    for text in expected:
        assert text in r.err, f"{text!r} not in stderr:\n{r.err}"


def test_score_adds_a_reward_to_every_row(setup):
    runs, tmp, model = setup
    result = _ok(runs, "score")
    assert "scored 6 rows" in result.out
    assert "\r" not in result.err and "seq/s" not in result.err, result.err  # stderr is a file: no bar frames
    rows = [
        json.loads(line) for line in (tmp / "out" / "scored.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    assert [{k: v for k, v in r.items() if k != "reward"} for r in rows] == _score_rows(6)
    expected = model.score([r["prompt"] for r in rows], [r["response"] for r in rows])
    assert [r["reward"] for r in rows] == pytest.approx(expected, abs=1e-6)
    _ok(runs, "score_normalized")
    normalized = (tmp / "out" / "n.jsonl").read_text(encoding="utf-8").splitlines()
    mean, std = model.reward_stats["mean"], model.reward_stats["std"]
    assert [json.loads(line)["reward"] for line in normalized] == pytest.approx(
        [(x - mean) / std for x in expected], abs=1e-5
    )


def test_score_reports_every_bad_row_and_writes_nothing(setup):
    runs, tmp, _ = setup
    bad = tmp / "bad.jsonl"
    _user_error(
        runs,
        "score_bad_rows",
        f"{bad}:2: response: missing or null",
        f"{bad}:3: prompt: empty or whitespace-only text",
        f"{bad}:4: response: expected text, got int",
    )
    assert f"{bad}:1:" not in runs.result("score_bad_rows").err
    assert not (tmp / "out" / "bad.jsonl").exists()


def test_score_needs_statistics_to_normalize_and_a_model(setup):
    runs, tmp, _ = setup
    _user_error(runs, "score_no_stats", "no reward statistics (reward_stats.json)", "lora-rm eval")
    _user_error(runs, "score_no_model", f"{tmp / 'nope'}: neither an adapter folder")
    assert not (tmp / "out" / "ns.jsonl").exists() and not (tmp / "out" / "nm.jsonl").exists()


def test_compare_prints_both_rewards_and_the_preference(setup):
    runs, _, model = setup
    out = _ok(runs, "compare").out.splitlines()
    expected = model.compare(PROMPTS[0], GOOD, BAD)
    assert out == [
        f"reward A: {expected['reward_a']:.4f}",
        f"reward B: {expected['reward_b']:.4f}",
        f"P(A preferred): {expected['p_a_preferred']:.4f}",
    ]
    _user_error(runs, "compare_empty", "B: empty or whitespace-only text")


def test_eval_writes_the_report_plots_and_statistics(setup):
    runs, tmp, _ = setup
    assert "accuracy" in _ok(runs, "eval").out
    out = tmp / "out" / "eval"
    report = json.loads((out / "eval.json").read_text(encoding="utf-8"))
    assert report["n_pairs"] == 10 and {"accuracy", "loss", "ties", "calibration"} <= report.keys()
    for name in ("reward_hist.png", "reliability.png", "training_curves.png"):
        assert (out / name).stat().st_size > 1000, name
    stats = json.loads((out / "reward_stats.json").read_text(encoding="utf-8"))
    assert stats["mean"] == report["reward_stats"]["mean"] and stats["source"] == str(tmp / "prefs.jsonl")
    # without --update-stats the model keeps the statistics of its training run: `score --normalize` is unchanged
    kept = (tmp / "run" / "merged" / "reward_stats.json").read_text(encoding="utf-8")
    assert kept == (tmp / "run" / "merged-stats.json").read_text(encoding="utf-8")


def test_eval_reads_the_test_split_says_so_and_sums_up_once(setup):
    runs, tmp, _ = setup
    out = _ok(runs, "eval_splits").out
    assert f"the test split of {tmp / 'splits'}" in out
    assert json.loads((tmp / "out" / "eval-s" / "eval.json").read_text(encoding="utf-8"))["n_pairs"] == 3
    assert sum("accuracy" in line for line in out.splitlines()) == 1, out


def test_eval_on_ranked_lists_reports_top1(setup):
    runs, tmp, _ = setup
    assert "top-1" in _ok(runs, "eval_ranked").out
    report = json.loads((tmp / "out" / "eval-r" / "eval.json").read_text(encoding="utf-8"))
    assert report["n_pairs"] == 12 and report["ranking"]["n_lists"] == 4
    stats = json.loads((tmp / "bare-too" / "reward_stats.json").read_text(encoding="utf-8"))  # --update-stats
    assert stats["mean"] == report["reward_stats"]["mean"]


def test_eval_rejects_bad_data_before_writing(setup):
    runs, tmp, _ = setup
    _user_error(runs, "eval_bad", f"{tmp / 'same.jsonl'}:1: rejected: identical to chosen")
    assert not (tmp / "out" / "eval-bad").exists()

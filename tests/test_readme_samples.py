"""scripts/readme_samples.py: the README's sample outputs sit in marked blocks, in the shape the script writes."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
_spec = importlib.util.spec_from_file_location("readme_samples", ROOT / "scripts" / "readme_samples.py")
samples = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(samples)

QUICKSTART_OUTPUT = """data: explicit format; train: 800 pairs
step 140/150: loss 0.0200, accuracy 0.990, lr 1e-05
step 150/150: loss 0.0191, accuracy 0.994, lr 0
saved adapter (LoRA + reward head) to {out}/adapter
eval: accuracy 0.990 (0 ties), loss 0.0463, ECE 0.024, reward-length spearman 0.184, 200 pairs; written to {out}/eval in 0.6s (scored 381 sequences (15546 tokens) in 0.2s: 2038.3 sequences/s, 83169 tokens/s)
saved merged model to {out}/merged in 0.7s (max reward difference vs adapter 7.15e-07)
final eval: accuracy 0.990 (0 ties), loss 0.0463, 200 pairs
done in 5.3s: adapter in {out}/adapter, merged model in {out}/merged
"""


def test_the_readme_samples_are_in_the_scripts_shape():
    found = samples.blocks((ROOT / "README.md").read_text(encoding="utf-8"))
    assert set(found) == {"quickstart", "serve"}
    quickstart = found["quickstart"].removeprefix("```\n").removesuffix("```\n").splitlines()
    assert samples.sample_problems(quickstart, samples.QUICKSTART_LINES) == []
    serve = found["serve"].removeprefix("```bash\n").removesuffix("```\n").splitlines()
    assert serve[:-1] == samples.SERVE_COMMANDS and re.fullmatch(samples.SERVE_ANSWER, serve[-1]), serve


def test_the_quickstart_sample_is_the_runs_last_lines(tmp_path):
    out = tmp_path / "quickstart"
    body = samples.quickstart_sample(QUICKSTART_OUTPUT.format(out=out), out)
    lines = body.splitlines()
    assert lines[1] == "step 150/150: loss 0.0191, accuracy 0.994, lr 0" and lines[-2].startswith(
        "done in 5.3s"
    )
    assert str(tmp_path) not in body and "runs/quickstart/merged in 0.7s" in body
    with pytest.raises(ValueError, match="changed shape"):
        samples.quickstart_sample(QUICKSTART_OUTPUT.format(out=out).replace("final eval", "last eval"), out)


def test_blocks_are_replaced_in_place():
    text = "a\n<!-- sample: serve -->\nold\n<!-- /sample -->\nb\n"
    new = samples.replace_blocks(text, {"serve": samples.serve_sample({"rewards": [0.5], "scores": [0.5]})})
    assert new.startswith("a\n<!-- sample: serve -->\n```bash\n") and new.endswith(
        "```\n<!-- /sample -->\nb\n"
    )
    assert '# {"rewards":[0.5],"scores":[0.5]}   (the quickstart model)' in new
    assert samples.replace_blocks(new, {}) == new
    with pytest.raises(KeyError, match="no sample block quickstart"):
        samples.replace_blocks(text, {"quickstart": "x"})

"""benchmarks/gpu.sh, the GPU check: valid bash, and its --dry-run lists every part under a time limit."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.sh"
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def test_gpu_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_dry_run_prints_each_part_with_its_limit(tmp_path):
    out = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", str(tmp_path)], capture_output=True, text=True, check=True
    ).stdout
    limits = [
        int(line.rsplit("limit ", 1)[1].rstrip("s)")) for line in out.splitlines() if line.startswith("### ")
    ]
    assert sum(limits) <= 8 * 60  # the whole check fits in 8 minutes
    for command in (
        "benchmarks/throughput.py --pairs 64 --batch-size 8 --precision bf16",
        "--quant 8bit --only plain packed",
        "--target-modules q_proj v_proj",
        "scripts/check_plan.py",
        "benchmarks/score.py --smollm2",  # the scoring rows (engine against plain transformers)
        "-m pytest -q -p no:randomly -m gpu tests",
    ):
        assert command in out, command
    assert "random weights of its shape" in out  # tmp_path holds no weights: they are built

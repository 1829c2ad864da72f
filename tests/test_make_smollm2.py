"""scripts/make_smollm2.py: `--help` is help (it once built the model into a folder named --help), and a folder
that is not its own build is refused before anything is downloaded."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_smollm2.py"


def test_help_prints_usage_and_builds_nothing(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--help"], cwd=tmp_path, capture_output=True, text=True
    )
    assert proc.returncode == 0 and "OUT_DIR" in proc.stdout
    assert list(tmp_path.iterdir()) == []


def test_a_foreign_folder_is_refused_and_kept(tmp_path):
    spec = importlib.util.spec_from_file_location("make_smollm2", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    (tmp_path / "notes.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(SystemExit, match="is not a SmolLM2 folder"):
        module.main(str(tmp_path))
    assert (tmp_path / "notes.txt").read_text(encoding="utf-8") == "mine"
    assert not (tmp_path.parent / (tmp_path.name + ".partial")).exists()

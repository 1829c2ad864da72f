"""docs/options.md is what scripts/make_options_doc.py writes from TrainConfig's fields today."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

from lora_rm.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def _make_options_doc():
    spec = importlib.util.spec_from_file_location(
        "make_options_doc", ROOT / "scripts" / "make_options_doc.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_options_doc_is_up_to_date():
    doc = (ROOT / "docs" / "options.md").read_text(encoding="utf-8")
    assert doc == _make_options_doc().render(), "run: python scripts/make_options_doc.py"


def test_options_doc_has_one_row_per_field_with_its_help():
    doc = (ROOT / "docs" / "options.md").read_text(encoding="utf-8")
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        assert f"| `{flag}` | `{field.name}` |" in doc, flag
        assert field.metadata["help"].replace("|", "\\|") in doc, flag

"""The two test lanes: the README names them, CI runs them, and an `integration` fixture puts its users in the
integration lane."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import integration

ROOT = Path(__file__).resolve().parents[1]


def _pytest_commands(text: str) -> list[str]:
    return [
        " ".join(line.split("#")[0].split())
        for line in text.splitlines()
        if line.startswith("python -m pytest")
    ]


def test_ci_runs_the_readmes_test_commands():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    install = re.search(r"## Install, run, test\n+```bash\n(.*?)```", readme, re.S).group(1)
    commands = _pytest_commands(install)
    assert commands == ["python -m pytest -q", "python -m pytest -q -m integration"]
    assert _pytest_commands((ROOT / ".ci" / "run").read_text(encoding="utf-8")) == commands


@pytest.fixture
@integration
def heavy():
    return "trained"


@pytest.fixture
def through(heavy):
    return heavy


def test_the_hook_marks_the_users_of_an_integration_fixture():
    import conftest

    class Item:
        def __init__(self, func):
            fixturedef = type("FixtureDef", (), {"func": func})()
            self._fixtureinfo = type("Info", (), {"name2fixturedefs": {"f": [fixturedef]}})()
            self.marks = []

        def add_marker(self, mark):
            self.marks.append(mark.name)

    heavy_user, light_user = Item(integration(lambda: None)), Item(lambda: None)
    conftest.pytest_collection_modifyitems(None, [heavy_user, light_user])
    assert heavy_user.marks == ["integration"] and light_user.marks == []


def test_through_an_integration_fixture(through, request):
    # not marked here: selected by `-m integration` only because the hook marked it
    assert through == "trained" and request.node.get_closest_marker("integration") is not None

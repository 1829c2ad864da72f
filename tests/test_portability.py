"""Windows-safe sources: text files opened as UTF-8, a __main__ guard on every script, no POSIX-only calls.

Static checks over the package, scripts/ and benchmarks/: a user on Windows gets cp1252 from open() without an encoding, and spawned workers re-import
a script that has no guard.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(
    p
    for d in ("lora_rm", "scripts", "benchmarks")
    for p in (ROOT / d).rglob("*.py")
    if "__pycache__" not in p.parts
)
SCRIPTS = sorted(p for d in ("scripts", "benchmarks") for p in (ROOT / d).glob("*.py"))
POSIX_MODULES = {"resource", "fcntl", "pwd", "grp", "termios", "pty"}
POSIX_ATTRS = {("os", n) for n in ("fork", "killpg", "getuid", "setsid", "getpgid", "uname")}
POSIX_ATTRS |= {("signal", n) for n in ("SIGKILL", "SIGHUP", "SIGUSR1", "SIGUSR2", "SIGALRM", "SIGCHLD")}


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _text_io_without_encoding(tree: ast.Module) -> list[int]:
    """Lines of open()/Path.open/read_text/write_text calls in text mode that name no encoding."""
    lines = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
        if name not in ("open", "read_text", "write_text"):
            continue
        keywords = {k.arg for k in node.keywords}
        # the mode: open(path, mode), Path.open(mode), gzip.open(path, mode); read/write_text have none
        positional = None if name != "open" else 1 if isinstance(func, ast.Name) or len(node.args) > 1 else 0
        mode = next((k.value for k in node.keywords if k.arg == "mode"), None)
        if mode is None and positional is not None and len(node.args) > positional:
            mode = node.args[positional]
        binary = isinstance(mode, ast.Constant) and isinstance(mode.value, str) and "b" in mode.value
        if not binary and "encoding" not in keywords:
            lines.append(node.lineno)
    return lines


def test_the_checker_sees_a_missing_encoding():
    bad = ast.parse("open('x')\nPath('x').read_text()\ngzip.open(p, 'rt')\n")
    good = ast.parse("open('x', 'rb')\nPath('x').write_text(s, encoding='utf-8')\ngzip.open(p, 'rb')\n")
    assert _text_io_without_encoding(bad) == [1, 2, 3]
    assert _text_io_without_encoding(good) == []


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_text_files_are_opened_as_utf8(path):
    assert _text_io_without_encoding(_tree(path)) == [], f"{path}: text I/O without encoding"


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_script_has_a_main_guard(path):
    guards = [
        node
        for node in _tree(path).body
        if isinstance(node, ast.If)
        and "__name__" in ast.unparse(node.test)
        and "__main__" in ast.unparse(node.test)
    ]
    assert guards, f'{path}: no `if __name__ == "__main__":` (spawned workers would re-run it)'


@pytest.mark.parametrize(
    "path", [p for p in SOURCES if "benchmarks" not in p.parts], ids=lambda p: str(p.relative_to(ROOT))
)
def test_no_posix_only_calls_on_the_training_path(path):
    found = []
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [n for n in names if n.split(".")[0] in POSIX_MODULES]
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            found += [f"{node.value.id}.{node.attr}"] if (node.value.id, node.attr) in POSIX_ATTRS else []
    assert found == [], f"{path}: POSIX-only {found}"

"""The package's layers point one way: the step folders import only the steps before them (data -> model ->
evaluation -> training, and serving beside training), no import cycle (lazy imports inside functions included),
config at the bottom, no private name imported from another module, and every module importable on its own."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lora_rm"
# every module by its dotted name under lora_rm ("data.read", "cli"); a folder's __init__ holds no code
MODULES = sorted(
    ".".join(p.relative_to(PACKAGE).with_suffix("").parts)
    for p in PACKAGE.rglob("*.py")
    if p.stem != "__init__"
)
FOLDERS = {"util", "data", "model", "evaluation", "training", "serving"}
# what each step folder may import besides itself and the base modules at the top (errors, config, args, loss,
# trl_names): the steps before it
STEPS_BEFORE = {
    "util": set(),
    "data": {"util"},
    "model": {"util", "data"},
    "evaluation": {"util", "data", "model"},
    "training": {"util", "data", "model", "evaluation"},
    "serving": {"util", "data", "model", "evaluation"},
}
BASE = {"errors", "config", "args", "loss", "trl_names"}


def _imports(module: str) -> list[tuple[str, list[str]]]:
    """(imported lora_rm module, names taken from it) for every import statement in `module`, at any depth."""
    tree = ast.parse(PACKAGE.joinpath(*module.split(".")).with_suffix(".py").read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "lora_rm":
            here = node.module.removeprefix("lora_rm").lstrip(".")
            subs = [f"{here}.{a.name}".lstrip(".") for a in node.names]
            if any(s in MODULES for s in subs):  # from lora_rm.evaluation import metrics, plots
                found += [(f"lora_rm.{s}", []) for s in subs if s in MODULES]
            else:
                found.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.split(".")[0] == "lora_rm"]
    return found


def _graph() -> dict[str, set[str]]:
    return {m: {target.removeprefix("lora_rm.") for target, _ in _imports(m)} - {m} for m in MODULES}


def _folder(module: str) -> str:
    return module.split(".")[0] if "." in module else "top"


def test_the_package_is_folders_of_steps():
    assert {_folder(m) for m in MODULES} == FOLDERS | {"top"}
    assert {m for m in MODULES if "." not in m} == BASE | {"cli"}
    for folder in FOLDERS:
        assert (PACKAGE / folder / "__init__.py").read_text(encoding="utf-8").startswith('"""'), folder


def test_each_step_imports_only_the_steps_before_it():
    graph = _graph()
    crossing = [
        f"{m} imports {target}"
        for m in MODULES
        for target in graph[m]
        if _folder(m) != _folder(target)
        and target not in BASE
        and not (_folder(m) in FOLDERS and _folder(target) in STEPS_BEFORE[_folder(m)])
        and not (m in BASE and _folder(target) == "util")
        and m != "cli"
    ]
    assert crossing == []
    # the base modules at the top import nothing of the steps but util
    assert [f"{m} -> {t}" for m in BASE for t in graph[m] if _folder(t) not in ("top", "util")] == []
    assert "cli" not in set().union(*graph.values())


def test_the_rule_above_sees_a_step_that_reaches_forward(monkeypatch):
    graph = _graph()
    graph["data.read"] = graph["data.read"] | {"training.train"}
    monkeypatch.setattr(sys.modules[__name__], "_graph", lambda: graph)
    with pytest.raises(AssertionError):
        test_each_step_imports_only_the_steps_before_it()


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as [a, b, ..., a], or [] when the graph is acyclic (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return []

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return []


def test_the_cycle_finder_sees_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_no_import_cycle_in_the_package():
    assert _cycle(_graph()) == []


def test_config_is_the_bottom_layer():
    """config (and the leaf modules it may use) import nothing else of the package."""
    graph = _graph()
    assert graph["config"] <= {"errors"}, graph["config"]
    assert graph["errors"] == set() and graph["util.atomic"] == set()


def test_no_private_name_crosses_a_module():
    crossing = [
        f"{m} imports {name} from {target}"
        for m in MODULES
        for target, names in _imports(m)
        for name in names
        if name.startswith("_")
    ]
    assert crossing == []


def _python(script: str) -> subprocess.CompletedProcess:
    """`script` run by a fresh interpreter in the repository; its output, once it has exited 0."""
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.integration
def test_every_module_imports_on_its_own():
    """Each module imported first, in a package where nothing else is loaded yet (one interpreter: torch
    and transformers are imported once, the lora_rm modules are dropped between imports)."""
    script = (
        "import importlib, sys\n"
        f"for name in {MODULES!r}:\n"
        "    for loaded in [m for m in sys.modules if m == 'lora_rm' or m.startswith('lora_rm.')]:\n"
        "        del sys.modules[loaded]\n"
        "    importlib.import_module('lora_rm.' + name)\n"
    )
    _python(script)


@pytest.mark.integration
def test_the_cli_leaves_heavy_libraries_to_the_commands_that_use_them():
    """`import lora_rm.cli` and `lora-rm --help` (what every command pays before it starts) import none of
    transformers, PEFT, accelerate, bitsandbytes, datasets or matplotlib."""
    heavy = ["transformers", "peft", "accelerate", "bitsandbytes", "datasets", "matplotlib"]
    script = (
        "import contextlib, io, sys\n"
        "from lora_rm.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    main(['--help'])\n"
        f"print([m for m in {heavy!r} if m in sys.modules])\n"
    )
    proc = _python(script)
    assert proc.stdout.strip() == "[]"


@pytest.mark.integration
def test_the_package_imports_without_the_serve_extra():
    """FastAPI, uvicorn and pydantic (the `serve` extra) are imported by `lora-rm serve` only: with them
    missing, the package, the server's modules and `lora-rm --help` still import and run."""
    extra = ["fastapi", "starlette", "uvicorn", "pydantic", "pydantic_core"]
    script = (
        "import contextlib, io, sys\n"
        f"for name in {extra!r}:\n"
        "    sys.modules[name] = None  # `import name` now raises ImportError\n"
        f"import lora_rm, {', '.join('lora_rm.' + m for m in MODULES if m.startswith('serving.'))}\n"
        "from lora_rm.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    main(['--help'])\n"
    )
    _python(script)

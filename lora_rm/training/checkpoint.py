"""Resumable checkpoints: only the trainable state, written atomically, verified on load.

A checkpoint is a folder `step-000200/` holding the adapter (LoRA + reward head, safetensors), the
optimizer (`torch.save` of plain tensors and numbers, read back with `weights_only=True`), scheduler and
trainer state (JSON), and the RNG states (tensors in safetensors, Python's as JSON). It is written to
`step-000200.partial/`, renamed, and only then marked complete with a `COMPLETE` file: a run killed at
any moment leaves either a complete checkpoint or one that resume ignores. `manifest.json` holds the sha256
and size of every file; resume checks them and falls back to the newest intact checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lora_rm.errors import UserError
from lora_rm.util.atomic import respect_umask, staged, write_text_atomic

MARKER = "COMPLETE"
MANIFEST = "manifest.json"
PREFIX = "step-"


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / f"{PREFIX}{step:06d}"


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints under `output_dir`, oldest first; partial or unmarked folders are ignored."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.glob(f"{PREFIX}*")
        if p.is_dir() and p.name[len(PREFIX) :].isdigit() and (p / MARKER).is_file()
    ]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def fingerprint(obj: Any) -> str:
    """A short stable hash of JSON-able data (token ids, config values)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:16]


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """RNG states as tensors (for safetensors) and JSON (Python's `random`); never pickled objects."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    version, internal, gauss = random.getstate()
    py = {"version": version, "internal": list(internal), "gauss": gauss}
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        tensors["numpy_keys"] = torch.from_numpy(keys.astype("int64"))
        py["numpy"] = {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)}
    except ImportError:
        pass
    return tensors, py


def restore_rng_state(tensors: dict[str, torch.Tensor], py: dict[str, Any]) -> None:
    """Restore what `rng_state` saved and check it took; raise RuntimeError if it did not."""
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    if "numpy" in py:
        import numpy as np

        n = py["numpy"]
        np.random.set_state(
            (n["kind"], tensors["numpy_keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"], n["cached"])
        )
    if (
        not torch.equal(torch.get_rng_state(), tensors["torch_cpu"])
        or list(random.getstate()[1]) != py["internal"]
    ):
        raise RuntimeError("random number generator state did not restore; resume would not be exact")


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    trainer_state: dict[str, Any],
    scaler: Any = None,
    keep_last: int | None = None,
) -> Path:
    """Write a complete checkpoint for `step` and prune old ones beyond `keep_last`. Returns its folder.

    A write that fails (disk full, permission) removes the staging folder and raises a UserError naming the
    file and the newest intact checkpoint, which is kept: old checkpoints are pruned only after this one is
    complete.
    """
    final = checkpoint_dir(Path(output_dir), step)
    try:  # a failed write becomes a UserError in `outdir.write_errors`, around the whole run
        _write_checkpoint(final, model, optimizer, scheduler, trainer_state, scaler)
    except BaseException:
        shutil.rmtree(final.with_name(final.name + ".partial"), ignore_errors=True)
        raise
    write_text_atomic(final / MARKER, str(step))
    if keep_last:
        for old in complete_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _write_checkpoint(final, model, optimizer, scheduler, trainer_state, scaler) -> None:
    with staged(final) as staging:  # also replaces an unmarked leftover from a killed run, or a damaged one
        model.save_pretrained(str(staging / "adapter"), safe_serialization=True)
        torch.save(optimizer.state_dict(), staging / "optimizer.pt")
        extra = {"scheduler": scheduler.state_dict(), "trainer": trainer_state}
        if scaler is not None:
            extra["scaler"] = scaler.state_dict()
        tensors, py_rng = rng_state()
        save_file(tensors, str(staging / "rng.safetensors"))
        extra["rng"] = py_rng
        (staging / "state.json").write_text(json.dumps(extra, indent=1), encoding="utf-8")
        respect_umask(staging)
        write_manifest(staging)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path) -> None:
    """`folder/manifest.json`: the size and sha256 of every file in `folder`, by relative path."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in (MANIFEST, MARKER))
    manifest = {
        p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")


def damage(path: Path) -> str | None:
    """What is wrong with checkpoint `path` (unmarked, no manifest, a file missing, cut short or changed), or
    None when every file matches its manifest."""
    if not (path / MARKER).is_file():
        return f"no {MARKER} marker (interrupted while saving)"
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"no {MANIFEST} (written by an older lora_rm, or damaged)"
    except (OSError, ValueError) as e:
        return f"{MANIFEST} unreadable ({type(e).__name__})"
    for name, want in manifest.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != want["bytes"]:
            return (
                f"{name} has {f.stat().st_size} bytes, {want['bytes']} were written (truncated or replaced)"
            )
        if _sha256(f) != want["sha256"]:
            return f"{name} does not match its checksum (changed or corrupted since it was written)"
    return None


def resume_checkpoint(output_dir: str | Path, resume: str, log: Any = print) -> Path:
    """The checkpoint `--resume` names: the newest intact one under `output_dir` ("latest"; damaged newer
    ones are reported and skipped), or the folder given, which must be intact. Raises UserError otherwise."""
    if resume != "latest":
        path = Path(resume)
        if not (path / "state.json").is_file() and not (path / MANIFEST).is_file():
            raise UserError(f"{path}: not a checkpoint folder (no state.json)")
        problem = damage(path)
        if problem:
            raise UserError(f"{path}: damaged checkpoint: {problem}; resume from an older one or start over")
        return path
    found = complete_checkpoints(output_dir)
    if not found:
        raise UserError(f"{output_dir}: no complete checkpoint to resume from")
    damaged = []
    for path in reversed(found):
        problem = damage(path)
        if problem is None:
            for bad in damaged:
                log(f"warning: skipping damaged checkpoint {bad}")
            return path
        damaged.append(f"{path.name}: {problem}")
    raise UserError(f"{output_dir}: every checkpoint is damaged; " + "; ".join(damaged))


def load_checkpoint(
    path: str | Path, model: Any, optimizer: Any, scheduler: Any, scaler: Any = None
) -> dict[str, Any]:
    """Restore trainable weights, optimizer, scheduler, scaler and RNG from `path`; return the trainer state.

    Raises UserError when `path` is not a complete checkpoint or a file in it cannot be read back.
    """
    path = Path(path)
    if not (path / MARKER).is_file():
        raise UserError(
            f"{path}: not a complete checkpoint (no {MARKER} marker); it was probably interrupted while saving"
        )
    try:
        return _load_checkpoint(path, model, optimizer, scheduler, scaler)
    except UserError:
        raise
    except Exception as e:  # a file damaged in a way its manifest missed (OSError, SafetensorError, ...)
        raise UserError(f"{path}: cannot restore the checkpoint ({type(e).__name__}: {e})") from None


def _load_checkpoint(path: Path, model: Any, optimizer: Any, scheduler: Any, scaler: Any) -> dict[str, Any]:
    from peft import set_peft_model_state_dict

    weights = load_file(str(path / "adapter" / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, weights)
    unexpected = list(getattr(result, "unexpected_keys", []))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = [k for k in getattr(result, "missing_keys", []) if k in trainable]  # the base is not saved
    if unexpected or missing:
        raise UserError(
            f"{path}: checkpoint weights do not fit this model (unexpected {unexpected[:3]}, missing {missing[:3]})"
        )
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
    state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    restore_rng_state(load_file(str(path / "rng.safetensors")), state["rng"])
    return state["trainer"]

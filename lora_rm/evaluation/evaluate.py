"""Evaluation of a reward model on preference pairs.

`evaluate` is the quick one run during training: loss, accuracy (ties count half), mean margin.
`write_full_eval` is the full one, run at the end of training and by `lora-rm eval`: it adds the margin
distribution, calibration, length bias, ranked-list metrics and the reward statistics used to normalise
scores, and writes eval.json, PNG plots and reward_stats.json.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lora_rm.data.batches import plan_batches
from lora_rm.data.encode import EncodedPair
from lora_rm.data.sequences import common_prefix_len
from lora_rm.evaluation import metrics, plots
from lora_rm.loss import LN2, PairStats, all_pairs_loss, loss_near_chance, pairwise_loss, plackett_luce_loss
from lora_rm.model.collate import PreferenceCollator, pad_sequences
from lora_rm.model.engine import Throughput, score_sequences
from lora_rm.model.folder_fit import check_rewards_finite
from lora_rm.model.rewards import compute_rewards, pair_rewards
from lora_rm.util.atomic import write_text_atomic
from lora_rm.util.quiet import progress

STATS_FILE = "reward_stats.json"


@torch.no_grad()
def evaluate(
    model: Any,
    pairs: list[EncodedPair],
    collator: PreferenceCollator,
    batch_size: int,
    accelerator: Any = None,
) -> dict[str, float | int]:
    """Loss, accuracy, ties, mean margin and pair count over `pairs`, gathered across processes.

    The loss here is the plain pairwise loss (margins applied, no centering term), so it is comparable
    across runs with different regularisation. The model is put back in training mode if it was.
    """
    was_training = model.training
    model.eval()
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    device = accelerator.device if accelerator else next(model.parameters()).device
    stats = PairStats()
    batches = plan_batches(len(pairs), batch_size, seed=0, epoch=0, shuffle=False)
    own = batches[rank::world]  # no padding: every pair is counted exactly once
    with progress(len(pairs), "eval", unit="pair", enabled=rank == 0) as bar:
        for idx in own:
            batch = collator([pairs[i] for i in idx]).to(device)
            r_c, r_r = pair_rewards(model, batch)
            stats.add(r_c, r_r, pairwise_loss(r_c, r_r, batch.margin))
            bar.update(len(idx) * world)
    if world > 1:
        names = [f.name for f in dataclasses.fields(stats)]
        sums = torch.tensor([getattr(stats, n) for n in names], dtype=torch.float64, device=device)
        sums = accelerator.reduce(sums, reduction="sum").tolist()
        stats = PairStats(**{n: type(getattr(stats, n))(v) for n, v in zip(names, sums)})
    model.train(was_training)
    return stats.summary()


@torch.no_grad()
def sequence_rewards(
    model: Any, seqs: list[list[int]], pad_token_id: int, batch_size: int = 16, progress: Any = None
) -> torch.Tensor:
    """Raw rewards [N] (float32, on the CPU) of token-id sequences, in their order.

    Sequences are batched longest first (little padding), padded on the right and pooled by
    `compute_rewards`, in eval mode. `progress`, if given, is called with the count done after each batch.
    """
    was_training = model.training
    if was_training:  # eval() walks every module: per call, a tenth of a one-text request on a small model
        model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    out = torch.empty(len(seqs), dtype=torch.float32)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        ids, mask = pad_sequences([seqs[i] for i in idx], pad_token_id)
        out[idx] = compute_rewards(model, ids.to(device), mask.to(device)).float().cpu()
        if progress is not None:
            progress(len(idx))
    if was_training:
        model.train()
    return out


def _ranked_lists(pairs: list[EncodedPair], rewards: dict[tuple[int, ...], float]) -> list[list[float]]:
    """Rewards of each ranked list, best first: a list's pairs come in rank order (i < j), so its
    responses first appear in rank order (a response identical to a better one is not repeated)."""
    lists: dict[int, dict[tuple[int, ...], float]] = {}
    for p in pairs:
        if p.group is not None:
            seen = lists.setdefault(p.group, {})
            for side in (tuple(p.chosen), tuple(p.rejected)):
                seen.setdefault(side, rewards[side])
    return [list(v.values()) for v in lists.values()]


def full_evaluation(
    model: Any,
    pairs: list[EncodedPair],
    pad_token_id: int,
    batch_size: int = 16,
    max_tokens: int | None = None,
    log: Any = print,
) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    """(report, chosen rewards, rejected rewards) of `pairs`, each distinct sequence scored once by the scoring
    engine (`lora_rm.model.engine`: sides that share a prompt in one row, `max_tokens` per forward, default
    batch_size x the longest sequence; `log` gets its line when the model needs plain rows).

    The report has `accuracy` (ties count half), `ties`, `loss` (margins applied), `n_pairs`, the margin
    mean, std and quantiles, `calibration` (ECE and curve), `length_bias` (response length in tokens after
    the prefix both sides share), `reward_stats` (mean and std of every scored sequence), `ranking` for
    ranked lists (top-1 accuracy, Plackett-Luce and all-pairs loss per list) and `warnings`.
    """
    index: dict[tuple[int, ...], int] = {}
    for p in pairs:
        for side in (p.chosen, p.rejected):
            index.setdefault(tuple(side), len(index))
    seqs = [list(k) for k in index]
    budget = max_tokens or batch_size * max(len(s) for s in seqs)
    with progress(len(index), "full eval", unit="seq") as bar:
        rewards = score_sequences(model, seqs, pad_token_id, max_tokens=budget, progress=bar.update, log=log)
    check_rewards_finite(rewards, getattr(model, "name_or_path", None))
    r_c = rewards[[index[tuple(p.chosen)] for p in pairs]]
    r_r = rewards[[index[tuple(p.rejected)] for p in pairs]]
    margin = torch.tensor([p.margin for p in pairs], dtype=torch.float64)
    report: dict[str, Any] = metrics.pairwise_summary(r_c, r_r)
    report["loss"] = float(F.softplus(-(r_c.double() - r_r.double() - margin)).mean())
    shared = [common_prefix_len(p.chosen, p.rejected) for p in pairs]
    report["calibration"] = metrics.calibration(r_c, r_r)
    report["length_bias"] = metrics.length_bias(
        r_c,
        r_r,
        [len(p.chosen) - n for p, n in zip(pairs, shared)],
        [len(p.rejected) - n for p, n in zip(pairs, shared)],
    )
    report["reward_stats"] = {
        "mean": float(rewards.double().mean()),
        "std": float(rewards.double().std(unbiased=False)),
        "n_rewards": len(index),
    }
    lists = _ranked_lists(pairs, {k: float(rewards[i]) for k, i in index.items()})
    if lists:
        tensors = [torch.tensor(v, dtype=torch.float64) for v in lists]
        report["ranking"] = {
            "n_lists": len(lists),
            "top1_accuracy": metrics.top1_accuracy(lists),
            "plackett_luce_loss": float(sum(plackett_luce_loss(t) for t in tensors)) / len(lists),
            "all_pairs_loss": float(sum(all_pairs_loss(t) for t in tensors if t.numel() > 1)) / len(lists),
        }
    warning = chance_warning(report["loss"], report["margin_std"])
    report["warnings"] = [warning] if warning else []
    return report, r_c, r_r


def chance_warning(loss: float, margin_std: float) -> str | None:
    """A warning when the model gives chosen and rejected nearly equal rewards: loss within 0.01 of ln 2 *and*
    margins that barely spread (std < 0.1). A loss near ln 2 with wide margins is a model that learned a hard
    task a little (docs/benchmarks.md has such a run), not one that learned nothing."""
    if loss_near_chance(loss) and margin_std < 0.1:
        return (
            f"loss {loss:.4f} is ~ln 2 ({LN2:.4f}) and the margins' std is {margin_std:.3f}: chosen and "
            "rejected get nearly equal rewards"
        )
    return None


def _json_safe(value: Any) -> Any:
    """NaN and infinities (e.g. an undefined correlation) as null: JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def write_reward_stats(
    model_dir: str | Path, stats: dict[str, Any], source: str | None = None
) -> Path | None:
    """Write `reward_stats.json` (mean and std of raw rewards) into a model folder, for normalised scores.
    Writes nothing and returns None when the rewards do not spread (std 0 or not finite): normalising divides
    by the std, and a model folder with such stats is refused on load."""
    if not (math.isfinite(stats["mean"]) and math.isfinite(stats["std"]) and stats["std"] > 0):
        return None
    path = Path(model_dir) / STATS_FILE
    write_text_atomic(path, json.dumps({**stats, "source": source}, indent=2))
    return path


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """The numbers of a full evaluation `report` that the quick `evaluate` also gives, in its names."""
    return {
        **{k: report[k] for k in ("loss", "accuracy", "ties", "n_pairs")},
        "mean_margin": report["margin_mean"],
    }


def write_full_eval(
    model: Any,
    tokenizer: Any,
    pairs: list[EncodedPair],
    out_dir: str | Path,
    model_dirs: Iterable[str | Path | None] = (),
    metrics_jsonl: str | Path | None = None,
    batch_size: int = 16,
    source: str | None = None,
    log: Any = print,
    record_eval: Callable[[dict[str, Any]], None] | None = None,
    max_tokens: int | None = None,
) -> dict[str, Any]:
    """Run `full_evaluation` and write into `out_dir`: eval.json, reward_hist.png, reliability.png and,
    when `metrics_jsonl` has training records, training_curves.png; reward_stats.json goes into
    `out_dir` and every folder of `model_dirs` (None entries skipped). `record_eval` (end of training) gets
    the eval metrics, in metrics.jsonl's names, before the curves are drawn. Returns the report ({} without
    pairs, when only the training curves are drawn). `max_tokens` bounds one forward (`full_evaluation`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    speed = Throughput(list({tuple(s) for p in pairs for s in (p.chosen, p.rejected)}))
    report, r_c, r_r = (
        full_evaluation(model, pairs, tokenizer.pad_token_id, batch_size, max_tokens, log)
        if pairs
        else ({}, [], [])
    )
    scored = speed.line()
    if report and record_eval is not None:
        record_eval({f"eval_{k}": v for k, v in summary(report).items()})
    if metrics_jsonl is not None and Path(metrics_jsonl).is_file():
        try:
            plots.training_curves(metrics_jsonl, out / "training_curves.png")
        except ValueError as e:  # no training records yet
            log(f"eval: no training curves ({e})")
    if not pairs:
        log("eval: no eval pairs, so no eval.json and no reward_stats.json")
        return {}
    write_text_atomic(out / "eval.json", json.dumps(_json_safe(report), indent=2))
    plots.reward_histograms(r_c, r_r, out / "reward_hist.png")
    plots.reliability_curve(
        report["calibration"]["curve"], report["calibration"]["ece"], out / "reliability.png"
    )
    written = [
        write_reward_stats(f, report["reward_stats"], source) for f in [out, *model_dirs] if f is not None
    ]
    if None in written:
        log(
            f"eval: the rewards do not spread (std {report['reward_stats']['std']}): no reward_stats.json, no --normalize"
        )
    bias = report["length_bias"]
    log(
        f"eval: accuracy {report['accuracy']:.3f} ({report['ties']} ties), loss {report['loss']:.4f}, "
        f"ECE {report['calibration']['ece']:.3f}, reward-length spearman {bias['reward_length_spearman']:.3f}, "
        f"{report['n_pairs']} pairs"
        + (f"; top-1 {report['ranking']['top1_accuracy']:.3f}" if "ranking" in report else "")
        + f"; written to {out} in {time.perf_counter() - started:.1f}s ({scored})"
    )
    for warning in report["warnings"]:
        log(f"warning: {warning}")
    return report

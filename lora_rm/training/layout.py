"""The row layout of a run: plain padded rows, prefix-shared rows, or packed rows, chosen from the model (a probe
on real pairs) and the config, and the batch plan of each epoch that goes with it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lora_rm.config import TrainConfig
from lora_rm.data.batches import (
    pair_cost,
    plan_batches,
    plan_length_grouped_batches,
    plan_ranked_list_batches,
)
from lora_rm.data.encode import EncodedPair
from lora_rm.data.sequences import common_prefix_len
from lora_rm.errors import UserError
from lora_rm.model.collate import PackedCollator, PreferenceCollator
from lora_rm.model.probe import LayoutProbe, probe_packed_layout


@dataclass
class Layout:
    """How a run lays out its pairs: the collator that builds rows, and how each epoch is cut into batches.

    The batches of an epoch depend on (seed, epoch) only (`lora_rm.data.batches.epoch_generator`), so a resumed run
    recomputes exactly the plan an uninterrupted one follows.
    """

    collator: Any  # PreferenceCollator or PackedCollator
    costs: list[int]  # tokens each pair occupies in this layout
    groups: list[int | None]  # the ranked list each pair comes from
    batch_size: int
    seed: int
    ranked: bool = False  # plackett_luce: each ranked list's chain of pairs must share a micro-batch
    grouped: bool = False  # length-grouped batches
    max_tokens: int | None = None  # cut batches by a token budget instead of a pair count
    packed: bool = False

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The micro-batches of `epoch`, as lists of pair indices, for all processes together."""
        if self.ranked:
            return plan_ranked_list_batches(self.groups, self.batch_size, self.seed, epoch)
        if not self.grouped:
            return plan_batches(len(self.costs), self.batch_size, self.seed, epoch)
        return plan_length_grouped_batches(
            self.costs, self.batch_size, self.seed, epoch, self.max_tokens, self.packed
        )


def choose_layout(
    cfg: TrainConfig,
    model: Any,
    pairs: list[EncodedPair],
    pad_token_id: int,
    max_length: int,
    log: Any = print,
) -> Layout:
    """The layout for this model and config.

    Causal decoders whose packed rewards match plain ones up to their own batch-to-batch noise
    (`lora_rm.model.probe.probe_packed_layout`; LLM.int8 bases have such noise) get the prompt shared and several
    pairs per row (one pair per row with `packing=off`); other models fall back to plain padded rows. The
    log line gives the probe's two numbers either way.
    Forcing a mode on for a model that cannot take it is a UserError.
    """
    wanted = {name: getattr(cfg, name) for name in ("share_prefix", "packing")}
    probe = None
    if any(v != "off" for v in wanted.values()):
        probe = probe_packed_layout(model, probe_pairs(pairs), pad_token_id)
    works = probe is not None and probe.exact
    forced = [name for name, v in wanted.items() if v == "on" and not works]
    if forced:
        raise UserError(
            f"{' and '.join(forced)} forced on, but {cfg.base} does not give the same rewards with a "
            f"4D attention mask ({describe(probe)}; encoders and some architectures cannot); use auto or off"
        )
    share = works and wanted["share_prefix"] != "off"
    # auto packs whenever the prompt is shared: on GPT-2 small it is faster and leaner than one pair per row
    # (docs/benchmarks.md); rows hold up to max_length tokens, a longer pair sits alone in its row
    packed = works and (wanted["packing"] == "on" or (wanted["packing"] == "auto" and share))
    if not works and any(v == "auto" for v in wanted.values()):
        log(
            f"layout: {cfg.base} cannot take prefix-shared rows (4D mask; {describe(probe)}); using plain padded rows"
        )
    if share or packed:
        collator: Any = PackedCollator(
            pad_token_id, share_prefix=share, row_tokens=max_length if packed else None
        )
    else:
        collator = PreferenceCollator(pad_token_id)
    layout = Layout(
        collator,
        costs=[pair_cost(p, share or packed) for p in pairs],
        groups=[p.group for p in pairs],
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        ranked=cfg.loss == "plackett_luce",
        grouped=cfg.group_by_length or cfg.max_tokens_per_batch is not None,
        max_tokens=cfg.max_tokens_per_batch,
        packed=packed,
    )
    log(
        f"layout: {'packed ' if packed else ''}{'prefix-shared' if share else 'plain'} rows, "
        f"{'length-grouped ' if layout.grouped else ''}"
        f"{'token-budget' if cfg.max_tokens_per_batch else 'pair-count'} batches"
        + (f" ({describe(probe)})" if works else "")
    )
    return layout


def probe_pairs(pairs: list[EncodedPair], n: int = 4, among: int = 64) -> list[EncodedPair]:
    """The pairs the layout probe scores: the `n` shortest of the first `among` (a cheap probe), those that
    share a prefix first (the case the layout changes)."""
    return sorted(
        pairs[:among],
        key=lambda p: (common_prefix_len(p.chosen, p.rejected) == 0, len(p.chosen) + len(p.rejected)),
    )[:n]


def describe(probe: LayoutProbe | None) -> str:
    """The probe's numbers for the log: how far packed rewards are from plain ones, and the noise floor."""
    if probe is None:
        return "not probed"
    if probe.packed_diff == float("inf"):
        return "the model rejects it"
    return (
        f"packed vs plain rewards max |diff| {probe.packed_diff:.1e}, "
        f"noise floor between plain batchings {probe.noise_floor:.1e}"
    )

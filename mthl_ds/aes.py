"""AdaMV-MoE's adaptive expert selection (AES, Algorithm 1 of ``papers/adamv_moe.md``) and its held-out split.

Per dataset: K starts at the configured top_k (1 in the paper) with ``improved = True`` and ``best = inf``.
At every check the dataset's held-out loss is compared with its best; a lower loss becomes the best and sets
``improved``. When the best has not decreased for ``patience`` steps: if the last growth improved it, K grows
by one (``improved = False``, and the patience count restarts from the growth); if not, K steps back by one
and is fixed for the rest of the run. A K that reaches the number of experts is fixed there.

The decisions depend only on the (all-reduced) losses, so every rank takes them at the same step.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass
class Selection:
    """AES state of one dataset."""
    k: int
    best: float = math.inf
    improved: bool = True
    since: int = 0  # the step the patience count runs from: the last new best or the last growth
    fixed: bool = False


@dataclass
class AdaptiveTopK:
    """Algorithm 1 for every dataset at once. ``observe`` returns the changes it made (empty most of the time)."""
    start: dict[str, int]
    max_k: int
    patience: int
    datasets: dict[str, Selection] = field(default_factory=dict)

    def __post_init__(self):
        if not self.datasets:
            self.datasets = {name: Selection(k) for name, k in self.start.items()}

    @property
    def top_k(self) -> dict[str, int]:
        return {name: s.k for name, s in self.datasets.items()}

    @property
    def done(self) -> bool:
        return all(s.fixed for s in self.datasets.values())

    def observe(self, step: int, losses: dict[str, float]) -> list[dict]:
        changes = []
        for name, loss in losses.items():
            s = self.datasets[name]
            if s.fixed:
                continue
            if loss < s.best:
                s.best, s.improved, s.since = loss, True, step
                continue
            if step - s.since < self.patience:
                continue
            before = s.k
            if s.improved and s.k < self.max_k:
                s.k, s.improved, s.since, why = s.k + 1, False, step, "grow"
            else:
                s.k, s.fixed = (s.k if s.improved else s.k - 1), True
                why = "fix" if s.improved else "step back and fix"
            changes.append({"step": step, "dataset": name, "k_from": before, "k_to": s.k, "action": why,
                            "loss": loss, "best": s.best})
        return changes

    def state_dict(self) -> dict:
        return {name: asdict(s) for name, s in self.datasets.items()}

    def load_state_dict(self, state: dict) -> None:
        self.datasets = {name: Selection(**s) for name, s in state.items()}


def heldout_positions(shard_counts: list[int], fraction: float, seed: int, at_least: int = 1) -> dict[int, set[int]]:
    """The held-out samples of a shard set as ``{shard number: {sample index in the shard}}``: ``fraction`` of all
    samples (at least ``at_least``: one per rank), drawn by ``seed``. It needs only the index's per-shard counts,
    so every rank and reader derives the same split without reading a shard."""
    total = sum(shard_counts)
    count = min(total, max(at_least, round(fraction * total)))
    chosen = np.random.default_rng([seed, 7919]).choice(total, count, replace=False)
    starts = np.cumsum([0] + list(shard_counts))
    positions: dict[int, set[int]] = {}
    for sample in sorted(int(c) for c in chosen):
        shard = int(np.searchsorted(starts, sample, side="right")) - 1
        positions.setdefault(shard, set()).add(sample - int(starts[shard]))
    return positions

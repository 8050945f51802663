"""Two-step sampling (Section 3.2): at step t pick one dataset by weight, then a whole batch from it.

The pick at step t comes from a generator keyed on (seed, t) alone: every rank draws the same dataset with
no communication, and a run resumed at step t continues the same sequence.
"""
from __future__ import annotations

from collections import Counter

import numpy as np


class TwoStepSampler:
    """``cycle``: take these datasets in turn instead (step t gets ``cycle[t % len(cycle)]``)."""

    def __init__(self, weights: dict[str, float], seed: int = 0, cycle: tuple[str, ...] = ()):
        if not weights:
            raise ValueError("two-step sampling needs at least one dataset")
        bad = {n: w for n, w in weights.items() if not w >= 0}
        if bad or sum(weights.values()) <= 0:
            raise ValueError(f"sampling weights must be >= 0 with a positive sum, got {weights}")
        self.names = list(weights)
        total = float(sum(weights.values()))
        self.probs = np.array([weights[n] / total for n in self.names])
        self.seed = seed
        self.cycle = tuple(cycle)

    def dataset_at(self, step: int) -> str:
        if self.cycle:
            return self.cycle[step % len(self.cycle)]
        u = np.random.default_rng([self.seed, step]).random()
        return self.names[min(int(np.searchsorted(np.cumsum(self.probs), u, side="right")), len(self.names) - 1)]

    def counts(self, start: int, stop: int) -> Counter:
        """How often each dataset is picked in steps [start, stop)."""
        return Counter(self.dataset_at(t) for t in range(start, stop))

    def realised_mix(self, counts: Counter) -> dict[str, dict[str, float]]:
        total = max(1, sum(counts.values()))
        return {n: {"steps": counts.get(n, 0), "share": counts.get(n, 0) / total, "target": float(p)}
                for n, p in zip(self.names, self.probs)}

"""Shared helpers for benchmarks: repeated side-by-side timing, median and spread, markdown tables."""
from __future__ import annotations

import statistics
import time
from typing import Callable


def timed(fn: Callable[[], object]) -> float:
    """Seconds of ``fn()``; where CUDA is available, from a synchronised start to the end of its GPU work."""
    import torch
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def side_by_side(candidate: Callable, baseline: Callable, repeats: int = 5, warmup: int = 1) -> dict:
    """Time ``candidate`` and ``baseline`` alternately in one process; ratios are per repeat, then summarised."""
    for _ in range(warmup):
        candidate()
        baseline()
    cand, base = [], []
    for _ in range(repeats):
        cand.append(timed(candidate))
        base.append(timed(baseline))
    ratios = [c / b for c, b in zip(cand, base)]
    return {"candidate_s": statistics.median(cand), "baseline_s": statistics.median(base),
            "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "repeats": repeats}


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)

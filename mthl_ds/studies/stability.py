"""``mthl-ds stability``: the demo trained with several seeds, and how steady its training was.

Per dataset: the final metric over the seeds (mean and sample standard deviation), and the worst loss excursion
of every seed: the largest ratio of the task's 20-step moving-average loss (over that dataset's own steps) to its
running minimum after warm-up. A run that blows up, even briefly, shows a large ratio; a steady one stays near 1.
Targets: no ratio above 3 for any dataset and seed, and a COCO mAP standard deviation of at most 3.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Sequence

import numpy as np

from mthl_ds.runfiles import read_metrics, row_kind

WINDOW = 20
MAX_RATIO = 3.0
MAX_MAP_STD = 3.0


def loss_excursion(rows: list[dict], dataset: str, warmup_steps: int, window: int = WINDOW) -> float:
    """max over t of MA(t) / min_{t' <= t} MA(t'), over the moving averages that end after warm-up."""
    steps = [r for r in rows if r.get("dataset") == dataset and row_kind(r) == "train" and not r.get("skipped")]
    losses = np.array([r["loss"] for r in steps], dtype=float)
    if len(losses) < window:
        return 1.0
    moving = np.convolve(losses, np.ones(window) / window, mode="valid")
    ends = np.array([r["step"] for r in steps[window - 1:]])
    moving = moving[ends >= warmup_steps]
    if not len(moving):
        return 1.0
    return float(np.max(moving / np.minimum.accumulate(moving)))


def summarise(runs: dict[int, Path], warmup_steps: int) -> dict:
    per_seed = {}
    for seed, run_dir in runs.items():
        rows = read_metrics(run_dir)
        final = json.loads((run_dir / "final_metrics.json").read_text())
        per_seed[seed] = {name: {"metric": m["metric"], "value": m["value"],
                                 "excursion": loss_excursion(rows, name, warmup_steps)} for name, m in final.items()}
    datasets = {}
    for name in next(iter(per_seed.values())):
        values = [per_seed[s][name]["value"] for s in per_seed]
        datasets[name] = {"metric": per_seed[next(iter(per_seed))][name]["metric"], "values": values,
                          "mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                          "excursions": [per_seed[s][name]["excursion"] for s in per_seed]}
    met = all(max(d["excursions"]) <= MAX_RATIO for d in datasets.values()) and all(
        d["std"] <= MAX_MAP_STD for d in datasets.values() if d["metric"] == "mAP")
    return {"seeds": list(runs), "datasets": datasets, "targets_met": met,
            "targets": {"max_excursion": MAX_RATIO, "max_map_std": MAX_MAP_STD}}


def format_summary(summary: dict) -> str:
    lines = [f"| dataset | metric | mean ± std over seeds {summary['seeds']} | per seed | largest 20-step loss / "
             "running minimum, per seed |", "|---|---|---|---|---|"]
    for name, d in summary["datasets"].items():
        lines.append(f"| {name} | {d['metric']} | {d['mean']:.1f} ± {d['std']:.1f} | "
                     + ", ".join(f"{v:.1f}" for v in d["values"]) + " | "
                     + ", ".join(f"{e:.2f}" for e in d["excursions"]) + " |")
    t = summary["targets"]
    lines.append(f"\ntargets (every ratio <= {t['max_excursion']}, COCO mAP std <= {t['max_map_std']}): "
                 + ("met" if summary["targets_met"] else "NOT met"))
    return "\n".join(lines)


def run_stability(out: Path, seeds: Sequence[int] = (0, 1, 2), recipe: str = "demo",
                  overrides: tuple[str, ...] = ()) -> dict:
    from mthl_ds.config import load_recipe
    from mthl_ds.studies.demo import run_demo
    out = out.resolve()
    warmup = load_recipe(recipe, overrides).train.warmup_steps
    runs = {}
    for seed in seeds:
        rc = run_demo(out / f"seed{seed}", overrides=(*overrides, f"train.seed={seed}"), recipe=recipe)
        if rc != 0:
            raise RuntimeError(f"the demo with seed {seed} failed (exit code {rc}); see {out / f'seed{seed}'}")
        runs[seed] = out / f"seed{seed}" / "run"
    summary = summarise(runs, warmup)
    (out / "stability.json").write_text(json.dumps(summary, indent=1) + "\n")
    table = format_summary(summary)
    (out / "stability.md").write_text(table + "\n")
    print(table)
    return summary

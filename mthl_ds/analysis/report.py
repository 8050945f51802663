"""The end-of-run report: a short markdown file with PNG plots of the losses, the eval metrics and the
dataset x expert usage of every MoE layer."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from mthl_ds.analysis.plots import plt
from mthl_ds.config import Recipe


def moving_average(values: list[float], window: int) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    if len(values) < window:
        return values
    return np.convolve(values, np.ones(window) / window, mode="valid")


def plot_losses(history: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for name in sorted({h["dataset"] for h in history}):
        rows = [h for h in history if h["dataset"] == name and not h.get("skipped")]
        window = max(1, len(rows) // 20)
        smooth = moving_average([h["loss"] for h in rows], window)
        ax.plot([h["step"] for h in rows][window - 1:], smooth, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("task loss (moving average)")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_metrics(results: dict, path: Path) -> None:
    names = list(results)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = np.arange(len(names))
    ax.bar(x - 0.2, [results[n]["value"] for n in names], 0.4, label="model")
    ax.bar(x + 0.2, [results[n]["chance"] for n in names], 0.4, label="chance")
    ax.set_xticks(x, [f"{n}\n{results[n]['metric']}" for n in names])
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_usage(usage: dict[str, torch.Tensor], path: Path) -> None:
    """One heatmap per MoE layer: datasets x experts, each row the dataset's share of routes (values printed,
    one colour scale for all layers)."""
    names = list(usage)
    layers = usage[names[0]].shape[0]
    cols = min(4, layers)
    rows = math.ceil(layers / cols)
    grids = []
    for layer in range(layers):
        grid = torch.stack([usage[n][layer] for n in names]).double().numpy()
        grids.append(grid / np.maximum(grid.sum(1, keepdims=True), 1))
    top = max(float(g.max()) for g in grids) or 1.0
    experts = grids[0].shape[1]
    fig, axes = plt.subplots(rows, cols, figsize=(0.45 * experts * cols + 2, 1.2 + 0.5 * len(names) * rows),
                             squeeze=False)
    image = None
    for layer in range(rows * cols):
        ax = axes[layer // cols][layer % cols]
        if layer >= layers:
            ax.axis("off")
            continue
        grid = grids[layer]
        image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=top)
        for (i, j), value in np.ndenumerate(grid):
            ax.text(j, i, f"{value:.2f}"[1:] if value < 1 else "1", ha="center", va="center", fontsize=5,
                    color="white" if value < top / 2 else "black")
        ax.set_title(f"MoE layer {layer}", fontsize=9)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.set_xticks(range(grid.shape[1]))
        ax.tick_params(axis="x", labelsize=6)
    fig.colorbar(image, ax=axes, shrink=0.8, label="share of the dataset's routes")
    fig.suptitle("share of routes per expert (rows: datasets)", fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_mi(history: list[dict], path: Path) -> list[float]:
    """MI(D; E) of each MoE layer's running buffer over training; returns the last values."""
    rows = [h for h in history if "mi" in h]
    fig, ax = plt.subplots(figsize=(7, 4))
    values = np.array([h["mi"] for h in rows])
    for layer in range(values.shape[1]):
        ax.plot([h["step"] for h in rows], values[:, layer], label=f"layer {layer}", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("MI(D; E) of B(D, E), nats")
    ax.set_title("routing specialisation by dataset")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return values[-1].tolist()


def write_report(run_dir: Path, recipe: Recipe, history: list[dict], results: dict,
                 usage: dict[str, torch.Tensor], mix: dict) -> Path:
    plot_losses(history, run_dir / "losses.png")
    plot_metrics(results, run_dir / "metrics.png")
    moe = recipe.model.moe
    kind = "dense (MTHL.D)" if moe is None else f"MoE {moe.num_experts} experts, top-{moe.top_k}"
    lines = [f"# Run report: {recipe.name}", "", f"{len(history)} logged steps of {recipe.train.steps}; "
             f"backbone `{recipe.model.backbone}`, " + kind,
             "", "## Evaluation", "", "| dataset | task | metric | value | chance | all |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        extra = ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in r["all"].items())
        lines.append(f"| {name} | {r['task']} | {r['metric']} | {r['value']:.2f} | {r['chance']:.2f} | {extra} |")
    lines += ["", "## Realised dataset mix", "", "| dataset | steps | share | target |", "|---|---|---|---|"]
    for name, m in mix.items():
        lines.append(f"| {name} | {m['steps']} | {m['share']:.3f} | {m['target']:.3f} |")
    lines += ["", "![losses](losses.png)", "", "![metrics](metrics.png)"]
    dropped = {name: [h["routes_dropped"] for h in history if h["dataset"] == name and "routes_dropped" in h]
               for name in results}
    if any(dropped.values()):
        lines += ["", "## Routes dropped by capacity", "", "The share of a training step's routes (every MoE layer, "
                  "every rank) over their expert's capacity, at the logged steps.", "",
                  "| dataset | logged steps | mean | max |", "|---|---|---|---|"]
        for name, shares in dropped.items():
            if shares:
                lines.append(f"| {name} | {len(shares)} | {100 * sum(shares) / len(shares):.2f}% | "
                             f"{100 * max(shares):.2f}% |")
    if usage:
        plot_usage(usage, run_dir / "usage.png")
        lines += ["", "## Expert usage", "", "Each row: the share of a dataset's training routes that went to each "
                  "expert, summed over the run. Experts specialise when the rows differ.", "", "![usage](usage.png)"]
    if any("mi" in h for h in history):
        last = plot_mi(history, run_dir / "mi.png")
        lines += ["", "## Mutual information of the routing", "",
                  f"MI(D; E) of each MoE layer's running buffer B(D, E): 0 when all datasets use the experts alike, "
                  f"log {len(results)} = {math.log(len(results)):.2f} nats when each expert serves one dataset. At the "
                  f"end: " + ", ".join(f"layer {i} {v:.3f}" for i, v in enumerate(last)) + ".", "", "![mi](mi.png)"]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path

"""The end-of-run report: a short markdown file with PNG plots of the losses, the eval metrics and the
dataset x expert usage of every MoE layer."""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from mthl_ds.config import Recipe  # noqa: E402


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
    """One heatmap per MoE layer: datasets x experts, each row the dataset's share of routes."""
    names = list(usage)
    layers = usage[names[0]].shape[0]
    cols = min(4, layers)
    rows = math.ceil(layers / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 1.2 + 0.45 * len(names) * rows), squeeze=False)
    for layer in range(rows * cols):
        ax = axes[layer // cols][layer % cols]
        if layer >= layers:
            ax.axis("off")
            continue
        grid = torch.stack([usage[n][layer] for n in names]).numpy()
        grid = grid / np.maximum(grid.sum(1, keepdims=True), 1)
        ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0)
        ax.set_title(f"MoE layer {layer}", fontsize=9)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.set_xticks(range(grid.shape[1]))
        ax.tick_params(axis="x", labelsize=6)
    fig.suptitle("share of routes per expert (rows: datasets)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(run_dir: Path, recipe: Recipe, history: list[dict], results: dict,
                 usage: dict[str, torch.Tensor], mix: dict) -> Path:
    plot_losses(history, run_dir / "losses.png")
    plot_metrics(results, run_dir / "metrics.png")
    lines = [f"# Run report: {recipe.name}", "", f"{len(history)} logged steps of {recipe.train.steps}; "
             f"backbone `{recipe.model.backbone}`, " + ("dense (MTHL.D)" if recipe.model.moe is None else
                                                        f"MoE {recipe.model.moe.num_experts} experts, top-{recipe.model.moe.top_k}"),
             "", "## Evaluation", "", "| dataset | task | metric | value | chance | all |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        extra = ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in r["all"].items())
        lines.append(f"| {name} | {r['task']} | {r['metric']} | {r['value']:.2f} | {r['chance']:.2f} | {extra} |")
    lines += ["", "## Realised dataset mix", "", "| dataset | steps | share | target |", "|---|---|---|---|"]
    for name, m in mix.items():
        lines.append(f"| {name} | {m['steps']} | {m['share']:.3f} | {m['target']:.3f} |")
    lines += ["", "![losses](losses.png)", "", "![metrics](metrics.png)"]
    if usage:
        plot_usage(usage, run_dir / "usage.png")
        lines += ["", "## Expert usage", "", "![usage](usage.png)"]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path

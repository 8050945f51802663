"""Routing statistics of a model on data: per MoE layer and dataset, how often each expert is chosen (before
capacity drops), and how much two datasets' routers agree on the same input (Mod-Squad Fig. A4: the mean share
of the K chosen experts two routers have in common, per token)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from mthl_ds.data.pipelines import PipelineConfig, eval_loader, make_decoder  # noqa: E402
from mthl_ds.data.reader import ShardSet  # noqa: E402
from mthl_ds.models.mthl import MTHLModel  # noqa: E402
from mthl_ds.report import plot_usage  # noqa: E402


class RouteRecorder:
    """Forward hooks on every gate: the experts each token was sent to, with capacity drops switched off."""

    def __init__(self, model: MTHLModel):
        self.gates = [layer.gate for layer in model.backbone.moe_layers]
        self.routes: list[torch.Tensor] = []

    def __enter__(self) -> "RouteRecorder":
        self.saved = [g.drop_tokens for g in self.gates]
        for g in self.gates:
            g.drop_tokens = False
        self.hooks = [g.register_forward_hook(self._record) for g in self.gates]
        return self

    def _record(self, gate, inputs, output) -> None:
        indices = output[3].long()  # (K, tokens), expert indices
        chosen = torch.zeros(indices.shape[1], gate.num_experts, dtype=torch.bool)
        chosen.scatter_(1, indices.t().clamp(min=0), indices.t() >= 0)
        self.routes.append(chosen)

    def take(self) -> list[torch.Tensor]:
        routes, self.routes = self.routes, []
        return routes

    def __exit__(self, *exc) -> None:
        for g, drop in zip(self.gates, self.saved):
            g.drop_tokens = drop
        for h in self.hooks:
            h.remove()


@torch.no_grad()
def routing_statistics(model: MTHLModel, data: dict[str, ShardSet], sizes: dict[str, tuple[int, int]],
                       batch_size: int = 16, max_images: Optional[int] = None, progress=print) -> dict:
    """``data``: shard sets by name. Usage is counted for each name the model has a router for, on that name's
    images; similarity compares every pair of routers on all the images."""
    model.eval()
    layers = model.backbone.moe_layers
    routers = list(model.backbone.datasets)
    usage = {name: [torch.zeros(layer.num_experts, dtype=torch.long) for layer in layers]
             for name in data if name in routers}
    shared = torch.zeros(len(layers), len(routers), len(routers), dtype=torch.float64)
    tokens = torch.zeros(len(layers), dtype=torch.float64)
    images = {}
    with RouteRecorder(model) as recorder:
        for name, shard_set in data.items():
            cfg = PipelineConfig(shard_set.task, sizes[name])
            seen = 0
            for batch in eval_loader(shard_set, make_decoder(cfg, train=False), batch_size):
                x = batch["image"][:max_images - seen] if max_images else batch["image"]
                chosen = {}
                for router in routers:
                    model.set_dataset(router)
                    model.backbone(x)
                    chosen[router] = recorder.take()
                for li in range(len(layers)):
                    masks = torch.stack([chosen[r][li] for r in routers]).float()  # (R, tokens, E)
                    ks = masks.sum(2)  # routes per token per router
                    overlap = torch.einsum("ate,bte->abt", masks, masks)
                    denom = torch.minimum(ks[:, None], ks[None, :]).clamp(min=1)
                    shared[li] += (overlap / denom).sum(-1).double()
                    tokens[li] += masks.shape[1]
                    if name in usage:
                        usage[name][li] += chosen[name][li].sum(0)
                seen += len(x)
                if max_images and seen >= max_images:
                    break
            images[name] = seen
            progress(f"stats: {name}: {seen} images")
    similarity = (shared / tokens.clamp(min=1)[:, None, None]).tolist()
    return {"routers": routers, "images": images,
            "layers": [{"experts": layer.num_experts,
                        "usage": {name: counts[li].tolist() for name, counts in usage.items()},
                        "similarity": similarity[li]} for li, layer in enumerate(layers)]}


def usage_of(stats: dict, name: str) -> list[list[int]]:
    """Per-layer expert counts of one dataset, from a statistics file."""
    if name not in stats["layers"][0]["usage"]:
        raise KeyError(f"the statistics have no usage for {name!r}; they cover {sorted(stats['layers'][0]['usage'])}")
    return [layer["usage"][name] for layer in stats["layers"]]


def plot_similarity(stats: dict, path: Path) -> None:
    names, layers = stats["routers"], stats["layers"]
    cols = min(4, len(layers))
    rows = math.ceil(len(layers) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.8 * cols, 2.6 * rows), squeeze=False)
    for i in range(rows * cols):
        ax = axes[i // cols][i % cols]
        if i >= len(layers):
            ax.axis("off")
            continue
        grid = np.asarray(layers[i]["similarity"])
        ax.imshow(grid, vmin=0, vmax=1, cmap="magma")
        for a in range(len(names)):
            for b in range(len(names)):
                ax.text(b, a, f"{grid[a, b]:.2f}", ha="center", va="center", fontsize=6, color="grey")
        ax.set_title(f"MoE layer {i}", fontsize=9)
        ax.set_xticks(range(len(names)), names, fontsize=7, rotation=45)
        ax.set_yticks(range(len(names)), names, fontsize=7)
    fig.suptitle("share of chosen experts two routers have in common on the same tokens", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_statistics(stats: dict, out: Path) -> list[Path]:
    """``out/routing_stats.json``, ``out/usage.png`` (dataset x expert per layer), ``out/similarity.png``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "routing_stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    width = max(layer["experts"] for layer in stats["layers"])
    names = list(stats["layers"][0]["usage"])
    paths = [out / "routing_stats.json"]
    if names:
        grid = {n: torch.zeros(len(stats["layers"]), width) for n in names}
        for li, layer in enumerate(stats["layers"]):
            for n in names:
                grid[n][li, :len(layer["usage"][n])] = torch.tensor(layer["usage"][n], dtype=torch.float)
        plot_usage(grid, out / "usage.png")
        paths.append(out / "usage.png")
    plot_similarity(stats, out / "similarity.png")
    return paths + [out / "similarity.png"]

"""Routing analysis of a model on data.

* usage and router similarity: per MoE layer and dataset, how often each expert is chosen (before capacity
  drops), and how much two datasets' routers agree on the same input (Mod-Squad Fig. A4: the mean share of the
  K chosen experts two routers have in common, per token);
* routing convergence (AdaMV-MoE Fig. 6): Hamming distance between the routing decisions of checkpoints;
* gradient conflict (AdaMV-MoE Fig. 7): cosine similarity of two datasets' loss gradients on shared parameters;
* patch-level expert maps (AdaMV-MoE Fig. 3): each patch's top-1 / top-2 experts drawn over the image.

"Layers" are the model's gates in order: its MoE MLPs, then its MoE attention layers (if any).

The model computes on its own device (``mthl-ds stats --device``): each batch is read on the CPU and copied there;
the routing records come back to the CPU, where the statistics are counted."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from mthl_ds.analysis.plots import plt
from mthl_ds.analysis.report import plot_usage
from mthl_ds.data.pipelines import MEAN, STD, PipelineConfig, eval_loader, make_decoder
from mthl_ds.data.reader import ShardSet
from mthl_ds.models.counting import count_parameters
from mthl_ds.models.mthl import MTHLModel
from mthl_ds.moe.gate import Routes
from mthl_ds.runtime.device import to_device


def gate_names(model: MTHLModel) -> list[str]:
    """Labels of ``model.backbone.gates``, in order."""
    return ([f"moe {i}" for i in range(len(model.backbone.moe_layers))]
            + [f"attention {i}" for i in range(len(model.backbone.attention_layers))])


class RouteRecorder:
    """Forward hooks on every gate (``model.backbone.gates``): the experts each token was sent to, ranked, with
    capacity drops switched off."""

    def __init__(self, model: MTHLModel):
        self.gates = model.backbone.gates
        self.ranked: list[list[torch.Tensor]] = [[] for _ in self.gates]

    def __enter__(self) -> "RouteRecorder":
        self.saved = [(g.drop_tokens, g.eval_drop_tokens) for g in self.gates]
        for g in self.gates:
            g.drop_tokens = g.eval_drop_tokens = False
        # gates fire in block order (attention, then MLP, block by block); records are kept per gate
        self.hooks = [g.register_forward_hook(lambda gate, inputs, output, i=i: self._record(i, output))
                      for i, g in enumerate(self.gates)]
        return self

    def _record(self, index: int, routes: Routes) -> None:
        self.ranked[index].append(routes.indices.long().t().cpu())  # (tokens, K) expert indices, highest gate first

    def take_ranked(self) -> list[torch.Tensor]:
        """Per gate (``model.backbone.gates`` order), since the last take: (tokens, K) chosen experts, top-1
        first."""
        if not all(self.ranked):
            raise RuntimeError("take() before every gate ran: run a forward of the backbone first")
        ranked = [torch.cat([F.pad(r, (0, max(x.shape[1] for x in records) - r.shape[1]), value=-1)
                             for r in records]) for records in self.ranked]  # forwards of different K: -1 pads
        self.ranked = [[] for _ in self.gates]
        return ranked

    def take(self) -> list[torch.Tensor]:
        """Per gate, since the last take: (tokens, E) boolean, the experts each token was sent to."""
        return [chosen_mask(r, g.num_experts) for r, g in zip(self.take_ranked(), self.gates)]

    def __exit__(self, *exc) -> None:
        for g, drop in zip(self.gates, self.saved):
            g.drop_tokens, g.eval_drop_tokens = drop
        for h in self.hooks:
            h.remove()


def on_model(model: MTHLModel, batch: dict) -> dict:
    """``batch`` with its tensors on the model's device and its image in the model's dtype (non_blocking copies)."""
    return to_device(batch, next(model.parameters()).device, model.dtype)


def model_input(model: MTHLModel, batch: dict) -> torch.Tensor:
    """The batch's image on the model's device, in its dtype."""
    return on_model(model, {"image": batch["image"]})["image"]


def chosen_mask(ranked: torch.Tensor, num_experts: int) -> torch.Tensor:
    chosen = torch.zeros(ranked.shape[0], num_experts, dtype=torch.bool)
    return chosen.scatter_(1, ranked.clamp(min=0), ranked >= 0)


def images_of(shard_set: ShardSet, size: tuple[int, int], batch_size: int, max_images: Optional[int] = None):
    """Batches of eval-decoded samples (padding left out), ``max_images`` in all at most."""
    seen = 0
    for batch in eval_loader(shard_set, make_decoder(PipelineConfig(shard_set.task, size), train=False), batch_size):
        keep = batch["valid"].clone()
        if max_images is not None:
            keep &= torch.arange(len(keep)) < max_images - seen
        if keep.any():
            rows = keep.nonzero().flatten().tolist()
            yield {k: v[keep] if torch.is_tensor(v) else [v[i] for i in rows] for k, v in batch.items()}
        seen += int(keep.sum())
        if max_images is not None and seen >= max_images:
            return


@torch.no_grad()
def routing_statistics(model: MTHLModel, data: dict[str, ShardSet], sizes: dict[str, tuple[int, int]],
                       batch_size: int = 16, max_images: Optional[int] = None, progress=print) -> dict:
    """``data``: shard sets by name. Usage is counted for each name the model has a router for, on that name's
    images; similarity compares every pair of routers on all the images."""
    model.eval()
    gates = model.backbone.gates
    routers = list(model.backbone.datasets)
    usage = {name: [torch.zeros(g.num_experts, dtype=torch.long) for g in gates] for name in data if name in routers}
    shared = torch.zeros(len(gates), len(routers), len(routers), dtype=torch.float64)
    tokens = torch.zeros(len(gates), dtype=torch.float64)
    images = {}
    with RouteRecorder(model) as recorder:
        for name, shard_set in data.items():
            images[name] = 0
            for batch in images_of(shard_set, sizes[name], batch_size, max_images):
                chosen = {}
                for router in routers:
                    model.set_dataset(router)
                    model.backbone(model_input(model, batch))
                    chosen[router] = recorder.take()
                for li in range(len(gates)):
                    masks = torch.stack([chosen[r][li] for r in routers]).float()  # (R, tokens, E)
                    ks = masks.sum(2)  # routes per token per router
                    overlap = torch.einsum("ate,bte->abt", masks, masks)
                    denom = torch.minimum(ks[:, None], ks[None, :]).clamp(min=1)
                    shared[li] += (overlap / denom).sum(-1).double()
                    tokens[li] += masks.shape[1]
                    if name in usage:
                        usage[name][li] += chosen[name][li].sum(0)
                images[name] += len(batch["image"])
            progress(f"stats: {name}: {images[name]} images")
    similarity = (shared / tokens.clamp(min=1)[:, None, None]).tolist()
    return {"routers": routers, "images": images,
            "layers": [{"name": label, "experts": g.num_experts,
                        "usage": {name: counts[li].tolist() for name, counts in usage.items()},
                        "similarity": similarity[li]}
                       for li, (label, g) in enumerate(zip(gate_names(model), gates))]}


# ------------------------------------------------------------------------ routing convergence (AdaMV-MoE Fig. 6)

@torch.no_grad()
def routing_decisions(model: MTHLModel, data: dict[str, ShardSet], sizes: dict[str, tuple[int, int]],
                      batch_size: int = 16, max_images: Optional[int] = None) -> dict[str, list[torch.Tensor]]:
    """Per dataset (its own router, its own images), per gate: (tokens, E) boolean routing decisions."""
    model.eval()
    missing = sorted(set(data) - set(model.backbone.datasets))
    if missing:
        raise KeyError(f"the model has no router for {missing}; it routes {model.backbone.datasets}")
    decisions = {}
    with RouteRecorder(model) as recorder:
        for name, shard_set in data.items():
            model.set_dataset(name)
            batches = []
            for batch in images_of(shard_set, sizes[name], batch_size, max_images):
                model.backbone(model_input(model, batch))
                batches.append(recorder.take())
            decisions[name] = [torch.cat(per_gate) for per_gate in zip(*batches)]
    return decisions


def routing_convergence(models: dict[str, MTHLModel], data: dict[str, ShardSet], sizes: dict[str, tuple[int, int]],
                        batch_size: int = 16, max_images: Optional[int] = 64, progress=print) -> dict:
    """Pairwise Hamming distances between the routing decisions of ``models`` (checkpoints of one run, by label)
    on the same images, per gate and dataset. ``hamming``: mean number of (token, expert) routes that differ per
    token, ``|A xor B|``; ``share``: that over ``|A| + |B|``, so 0 is the same choice and 1 disjoint experts
    (comparable across K, which AES changes during a run)."""
    labels = list(models)
    names = same_layers(models)
    decisions = {}
    for label, model in models.items():
        decisions[label] = routing_decisions(model, data, sizes, batch_size, max_images)
        progress(f"stats: routing decisions of {label}")
    layers = []
    for li, layer_name in enumerate(names):
        hamming, share = {}, {}
        for name in data:
            h = torch.zeros(len(labels), len(labels), dtype=torch.float64)
            f = torch.zeros_like(h)
            for a, la in enumerate(labels):
                for b in range(a + 1, len(labels)):  # symmetric, zero on the diagonal
                    lb = labels[b]
                    x, y = decisions[la][name][li], decisions[lb][name][li]
                    if x.shape != y.shape:
                        raise ValueError(f"{la} and {lb} route different numbers of experts in {layer_name}")
                    differ = (x ^ y).sum(1).double()
                    h[a, b] = h[b, a] = differ.mean()
                    f[a, b] = f[b, a] = (differ / (x.sum(1) + y.sum(1)).clamp(min=1)).mean()
            hamming[name], share[name] = h.tolist(), f.tolist()
        layers.append({"name": layer_name, "hamming": hamming, "share": share})
    return {"checkpoints": labels, "datasets": list(data), "layers": layers}


def same_layers(models: dict[str, MTHLModel]) -> list[str]:
    """The routed layers all ``models`` share; a ValueError naming the first model whose layers differ."""
    labels = list(models)
    names = gate_names(models[labels[0]])
    for label in labels[1:]:
        if gate_names(models[label]) != names:
            raise ValueError(f"{label} has routed layers {gate_names(models[label])}, {labels[0]} has {names}: "
                             "compare checkpoints of one model")
    return names


def plot_convergence(result: dict, path: Path) -> None:
    """One panel per layer: the share of differing routes between checkpoints, averaged over the datasets."""
    labels, layers = result["checkpoints"], result["layers"]
    grids = [np.mean([np.asarray(m) for m in layer["share"].values()], axis=0) for layer in layers]
    titles = [layer["name"] for layer in layers]
    ticks = [label if len(label) < 14 else "…" + label[-12:] for label in labels]
    heatmap_panels(grids, titles, ticks, path, vmax=1, cmap="viridis",
                   title="routing difference between checkpoints (|A xor B| / (|A|+|B|), per token)")


def heatmap_panels(grids: list[np.ndarray], titles: list[str], ticks: list[str], path: Path, vmax: float,
                   cmap: str, title: str) -> None:
    cols = min(4, len(grids))
    rows = math.ceil(len(grids) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.8 * cols, 2.6 * rows), squeeze=False)
    for i in range(rows * cols):
        ax = axes[i // cols][i % cols]
        if i >= len(grids):
            ax.axis("off")
            continue
        grid = grids[i]
        ax.imshow(grid, vmin=0, vmax=vmax, cmap=cmap)
        for a in range(grid.shape[0]):
            for b in range(grid.shape[1]):
                ax.text(b, a, f"{grid[a, b]:.2f}", ha="center", va="center", fontsize=6, color="grey")
        ax.set_title(titles[i], fontsize=9)
        ax.set_xticks(range(len(ticks)), ticks, fontsize=7, rotation=45)
        ax.set_yticks(range(len(ticks)), ticks, fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------- gradient conflict (AdaMV-MoE Fig. 7)

def shared_parameters(model: MTHLModel, pattern: Optional[str] = None) -> dict[str, torch.nn.Parameter]:
    """Backbone parameters every dataset's forward uses: not routers, not MoE experts, not the per-expert query /
    output projections of MoE attention. ``pattern``: keep only names matching this regular expression."""
    backbone = model.backbone
    routed = {id(p) for g in backbone.gates for p in g.parameters()}
    routed |= {id(p) for layer in backbone.moe_layers for _, p in layer.expert_parameters()}
    routed |= {id(p) for layer in backbone.attention_layers for p in (
        *layer.query.parameters(), *layer.out.parameters())}
    chosen = {n: p for n, p in backbone.named_parameters() if id(p) not in routed
              and (pattern is None or re.search(pattern, n))}
    if not chosen:
        raise ValueError(f"no shared backbone parameter matches {pattern!r}")
    return chosen


def gradient_cosine(model: MTHLModel, data: dict[str, ShardSet], sizes: dict[str, tuple[int, int]],
                    batches: int = 8, batch_size: int = 4, pattern: Optional[str] = None) -> dict:
    """For ``batches`` pairs of batches of the two datasets in ``data``: the cosine similarity between the
    gradients of their task losses (eval mode, no router losses) on the shared parameters, over all of them
    (``overall``) and per parameter tensor (``per_tensor``; tensors where either gradient is zero are left out)."""
    if len(data) != 2:
        raise ValueError(f"gradient cosine compares two datasets, got {list(data)}")
    model.eval()
    params = shared_parameters(model, pattern)
    names = list(params)
    streams = {name: images_of(shard_set, sizes[name], batch_size, batches * batch_size)
               for name, shard_set in data.items()}
    rows = []
    for first, second in zip(*streams.values()):
        grads = []
        for name, batch in zip(data, (first, second)):
            model.set_dataset(name)
            batch = on_model(model, batch)
            loss = model.heads[name].loss(model(batch["image"]), batch)[0]
            got = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            grads.append([torch.zeros_like(p) if g is None else g for g, p in zip(got, params.values())])
        flat = [torch.cat([g.flatten() for g in gs]) for gs in grads]
        per_tensor = {n: float(cosine(a, b)) for n, a, b in zip(names, *grads) if a.any() and b.any()}
        rows.append({"overall": float(cosine(*flat)), "per_tensor": per_tensor})
    if not rows:
        raise ValueError(f"no batch to compare: {list(data)} gave no images")
    overall = [r["overall"] for r in rows]
    tensors = [c for r in rows for c in r["per_tensor"].values()]
    return {"datasets": list(data), "pattern": pattern, "parameters": count_parameters(params.values()),
            "tensors": len(names), "batches": rows, "mean_overall": float(np.mean(overall)),
            "negative_share": float(np.mean([c < 0 for c in tensors])) if tensors else None}


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0)


def plot_gradient_cosine(result: dict, path: Path) -> None:
    tensors = [c for r in result["batches"] for c in r["per_tensor"].values()]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.hist(tensors, bins=40, range=(-1, 1), color="tab:blue", alpha=0.8, label="per parameter tensor")
    for i, r in enumerate(result["batches"]):
        ax.axvline(r["overall"], color="tab:red", lw=0.8, label="all shared parameters" if i == 0 else None)
    a, b = result["datasets"]
    ax.set_xlabel(f"cosine(grad {a}, grad {b})")
    ax.set_ylabel("count")
    ax.legend(fontsize=7)
    ax.set_title(f"gradient conflict on shared parameters ({len(result['batches'])} batch pairs)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -------------------------------------------------------------------- patch-level expert maps (AdaMV-MoE Fig. 3)

def token_grid(tokens: int, size: tuple[int, int], prefix: int = 0) -> tuple[int, int]:
    """(rows, cols) of a gate's ``tokens`` per image for an input of ``size``, after ``prefix`` tokens (a ViT's
    class token): the grid of the feature stride (4-64) that gives that count."""
    for stride in (4, 8, 14, 16, 32, 64):
        rows, cols = math.ceil(size[0] / stride), math.ceil(size[1] / stride)
        if rows * cols == tokens - prefix:
            return rows, cols
    raise ValueError(
        f"{tokens} tokens per image ({prefix} prefix) match no feature grid of a {size[0]}x{size[1]} input")


@torch.no_grad()
def expert_maps(model: MTHLModel, data: dict[str, ShardSet], sizes: dict[str, tuple[int, int]], count: int = 4,
                layer: int = -1) -> dict:
    """``count`` images per dataset with, for gate ``layer``, each patch's top-1 and top-2 experts (-1 where the
    dataset's K is 1) as (rows, cols) grids."""
    model.eval()
    gates = model.backbone.gates
    label = gate_names(model)[layer]
    maps = []
    with RouteRecorder(model) as recorder:
        for name, shard_set in data.items():
            model.set_dataset(name)
            for batch in images_of(shard_set, sizes[name], count, count):
                model.backbone(model_input(model, batch))
                ranked = recorder.take_ranked()[layer]
                per_image = ranked.view(len(batch["image"]), -1, ranked.shape[1])
                prefix = getattr(model.backbone.net, "num_prefix_tokens", 0)
                rows, cols = token_grid(per_image.shape[1], sizes[name], prefix)
                for image, routes in zip(batch["image"], per_image[:, prefix:]):
                    top2 = routes[:, 1] if routes.shape[1] > 1 else torch.full_like(routes[:, 0], -1)
                    maps.append({"dataset": name, "image": (image * STD + MEAN).clamp(0, 1),
                                 "top1": routes[:, 0].view(rows, cols), "top2": top2.view(rows, cols)})
    return {"layer": label, "experts": gates[layer].num_experts, "maps": maps}


def plot_expert_maps(result: dict, path: Path) -> None:
    """Each patch's border is coloured by its top-1 expert and its fill by its top-2 expert (Fig. 3)."""
    from matplotlib.patches import Rectangle
    maps = result["maps"]
    cols = min(4, len(maps))
    rows = math.ceil(len(maps) / cols)
    colours = plt.get_cmap("tab20" if result["experts"] > 10 else "tab10")
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
    for i in range(rows * cols):
        ax = axes[i // cols][i % cols]
        ax.axis("off")
        if i >= len(maps):
            continue
        m = maps[i]
        h, w = m["image"].shape[1:]
        ax.imshow(m["image"].permute(1, 2, 0).numpy())
        grid_h, grid_w = m["top1"].shape
        ph, pw = h / grid_h, w / grid_w
        for r in range(grid_h):
            for c in range(grid_w):
                top1, top2 = int(m["top1"][r, c]), int(m["top2"][r, c])
                if top2 >= 0:
                    ax.add_patch(Rectangle((c * pw, r * ph), pw, ph, color=colours(top2 % colours.N), alpha=0.35, lw=0))
                ax.add_patch(Rectangle((c * pw + 0.5, r * ph + 0.5), pw - 1, ph - 1, fill=False,
                                       edgecolor=colours(top1 % colours.N), lw=1.2))
        ax.set_title(m["dataset"], fontsize=8)
    fig.suptitle(f"{result['layer']}: border = top-1 expert, fill = top-2 expert", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def usage_of(stats: dict, name: str) -> list[list[int]]:
    """Per MoE MLP layer, the expert counts of one dataset from a statistics file (MoE attention rows, which
    pruning does not touch, left out)."""
    if name not in stats["layers"][0]["usage"]:
        raise KeyError(f"the statistics have no usage for {name!r}; they cover {sorted(stats['layers'][0]['usage'])}")
    return [layer["usage"][name] for layer in stats["layers"] if not layer.get("name", "").startswith("attention")]


def plot_similarity(stats: dict, path: Path) -> None:
    heatmap_panels([np.asarray(layer["similarity"]) for layer in stats["layers"]],
                   [layer.get("name", f"MoE layer {i}") for i, layer in enumerate(stats["layers"])], stats["routers"],
                   path, vmax=1, cmap="magma",
                   title="share of chosen experts two routers have in common on the same tokens")


def write_result(result: dict, out: Path, name: str, plot) -> list[Path]:
    """``out/NAME.json`` and ``out/NAME.png`` drawn by ``plot(result, path)``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out / f"{name}.png")
    return [out / f"{name}.json", out / f"{name}.png"]


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

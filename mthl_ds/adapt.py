"""Adaptation of an exported model to new datasets (Sections 3.3, 3.4, Table 3): which surgery a recipe's
``adapt`` section asks for, which parameters it trains, and the multi-phase modes of Table 3.

A recipe with an ``adapt`` section is an ordinary training recipe: the trainer builds the model with
:func:`adapted_model` instead of from scratch, under any launcher and ep_size. Frozen parameters have
``requires_grad=False`` and so are never given to the optimizer (no weight decay moves them).
"""
from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from typing import Optional

import torch
import yaml

from mthl_ds import surgery
from mthl_ds.config import ConfigError, Recipe, load_recipe, recipe_to_dict
from mthl_ds.export import ExportError, load_export, read_metadata, source_recipe
from mthl_ds.models.mthl import MTHLModel

# ------------------------------------------------------------------------------------------- one adapt recipe


def resolve_source(recipe: Recipe) -> Recipe:
    """The recipe with ``model`` taken from its ``adapt.source`` export (the model is the export's)."""
    if recipe.adapt is None:
        return recipe
    try:
        model = source_recipe(read_metadata(Path(recipe.adapt.source)), recipe.adapt.source).model
    except ExportError as e:
        raise ConfigError(f"adapt.source: {e}") from None
    return dataclasses.replace(recipe, model=model)


def per_layer_usage(recipe: Recipe, name: str, layers: int) -> list[torch.Tensor]:
    from mthl_ds.stats import usage_of
    path = Path(recipe.adapt.usage)
    if not path.is_file():
        raise ConfigError(f"adapt.usage: {path} does not exist (write it with mthl-ds stats --out)")
    try:
        counts = usage_of(json.loads(path.read_text()), name)
    except KeyError as e:
        raise ConfigError(f"adapt.usage: {path}: {e.args[0]}") from None
    if len(counts) != layers:
        raise ConfigError(f"adapt.usage: {path} has {len(counts)} MoE layers, the model has {layers}")
    return [torch.tensor(c, dtype=torch.float64) for c in counts]


def kept_experts(usage: torch.Tensor, fraction: float, threshold: float) -> list[int]:
    """Experts that survive pruning, in their order: drop ``round(fraction * E)`` least used, or every expert given
    less than ``threshold`` of the routes."""
    share = usage / usage.sum().clamp(min=1)
    if threshold:
        return [e for e in range(len(share)) if share[e] >= threshold]
    drop = round(fraction * len(share))
    order = sorted(range(len(share)), key=lambda e: (share[e].item(), e))  # least used first, ties by index
    return sorted(order[drop:])


def chosen_experts(usage: torch.Tensor, count: int, selection: str, seed: int) -> list[int]:
    """Table A1: ``count`` experts of a layer to fine-tune: random, most used or least used."""
    experts = list(range(len(usage)))
    if selection == "random":
        return sorted(random.Random(seed).sample(experts, count))
    ranked = sorted(experts, key=lambda e: (usage[e].item(), e), reverse=selection == "most_used")
    return sorted(ranked[:count])


def adapted_model(recipe: Recipe) -> MTHLModel:
    """The single-device model an adapt recipe trains: export + surgery, frozen as configured."""
    a = recipe.adapt
    try:
        model, _ = load_export(Path(a.source))
    except ExportError as e:
        raise ConfigError(f"adapt.source: {e}") from None
    torch.manual_seed(recipe.train.seed)  # new routers, heads and adapters: the same on every rank
    old_experts = [layer.num_experts for layer in model.backbone.moe_layers]
    default_k = model.built_from["model"]["moe"]["top_k"] if model.backbone.moe_layers else 1
    rules: list[dict] = []
    if a.add_experts:
        rules.append({"op": "add_experts", "count": a.add_experts, "seed": recipe.train.seed})
    for name, d in recipe.datasets.items():
        if name not in model.heads:
            rules.append({"op": "add_dataset", "name": name, "task": d.task, "num_classes": d.num_classes,
                          "top_k": d.top_k or default_k, "aux_weight": d.aux_weight, "head_channels": d.head_channels})
        elif model.tasks[name] != d.task:
            raise ConfigError(f"datasets.{name}: task {d.task!r}, but the exported model's {name!r} is {model.tasks[name]!r}")
    if not a.keep_datasets:
        rules += [{"op": "drop_dataset", "name": n} for n in model.heads if n not in recipe.datasets]
    apply(model, rules)
    layers = model.backbone.moe_layers
    # pruning and most/least-used selection follow the routing of the recipe's first dataset
    usage = per_layer_usage(recipe, next(iter(recipe.datasets)), len(layers)) if a.usage else None
    rules = []
    if a.prune_fraction or a.prune_threshold:
        kept = [kept_experts(u, a.prune_fraction, a.prune_threshold) for u in usage]
        rules.append({"op": "keep_experts", "kept": kept})
        usage = [u[k] for u, k in zip(usage, kept)]
    for name, d in recipe.datasets.items():
        if d.top_k and layers and d.top_k != layers[0].gate.top_k[name]:
            rules.append({"op": "set_top_k", "name": name, "k": d.top_k})
    if a.adapter_reduction:
        rules.append({"op": "add_adapters", "reduction": a.adapter_reduction})
    apply(model, rules)
    if a.freeze_backbone:
        tuned = []
        for index, layer in enumerate(layers):
            if a.tune_experts:
                layer_usage = usage[index] if usage else torch.zeros(layer.num_experts)
                if a.tune_experts > layer.num_experts:
                    raise ConfigError(f"adapt.tune_experts={a.tune_experts} but MoE layer {index} has {layer.num_experts} experts")
                tuned.append(chosen_experts(layer_usage, a.tune_experts, a.selection, recipe.train.seed * 1009 + index))
            else:
                tuned.append([])
            if a.add_experts:
                tuned[-1] += list(range(old_experts[index], layer.num_experts))
        surgery.freeze(model, trainable_names(model, list(recipe.datasets), tuned))
    return model


def apply(model: MTHLModel, rules: list[dict]) -> None:
    try:
        surgery.apply(model, rules)
    except surgery.SurgeryError as e:
        raise ConfigError(f"adapt: {e}") from None


def trainable_names(model: MTHLModel, datasets: list[str], experts: list[list[int]]) -> list[str]:
    """The routers (MoE MLP and MoE attention) and heads of ``datasets``, the listed experts of each MoE layer,
    and every adapter."""
    layer_names = {id(m): n for n, m in model.named_modules()}
    prefixes = [f"heads.{n}." for n in datasets]
    for layer, chosen in zip(model.backbone.moe_layers, experts):
        base = layer_names[id(layer)]
        prefixes += [f"{base}.deepspeed_moe.gate.routers.{n}." for n in datasets]
        prefixes += [f"{base}.deepspeed_moe.experts.deepspeed_experts.{e}." for e in chosen]
        prefixes.append(f"{base}.adapter.")
    for layer in model.backbone.attention_layers:
        prefixes += [f"{layer_names[id(layer)]}.gate.routers.{n}." for n in datasets]
    return [n for n, _ in model.named_parameters() if n.startswith(tuple(prefixes))]


# --------------------------------------------------------------------------------------- Table 3's modes

ROUTERS = {"freeze_backbone": True}
# name -> (phases, top_k): each phase is the adapt section of one run; a second phase starts from the first's
# export and reads the routing statistics of its new router (pruning, most/least-used selection).
MODES: dict[str, tuple[list[dict], Optional[int]]] = {
    "full": ([{"freeze_backbone": False}], None),
    "adapter": ([{"adapter_reduction": 4}], None),
    "routers": ([ROUTERS], None),
    "routers_1ex": ([{"tune_experts": 1}], None),
    "routers_2ex": ([{"tune_experts": 2}], None),
    "prune_theta1": ([ROUTERS, {"prune_threshold": 0.01, "freeze_backbone": False}], None),
    "prune_theta5": ([ROUTERS, {"prune_threshold": 0.05, "freeze_backbone": False}], None),
    "prune_half": ([ROUTERS, {"prune_fraction": 1 / 2, "freeze_backbone": False}], None),
    "prune_2_3": ([ROUTERS, {"prune_fraction": 2 / 3, "freeze_backbone": False}], None),
    "topk3": ([{"freeze_backbone": False}], 3),
    "topk2": ([{"freeze_backbone": False}], 2),
    "topk1": ([{"freeze_backbone": False}], 1),
    "hybrid_a": ([ROUTERS, {"prune_fraction": 2 / 3, "tune_experts": 1}], 2),
    "hybrid_b": ([ROUTERS, {"prune_fraction": 2 / 3, "tune_experts": 2}], 3),
}
# Table A1: the expert-selection ablation, on top of routers_1ex / routers_2ex
for _n in (1, 2):
    for _sel in ("most_used", "least_used"):
        MODES[f"routers_{_n}ex_{_sel}"] = ([ROUTERS, {"tune_experts": _n, "selection": _sel}], None)


@dataclasses.dataclass
class NewDataset:
    """A dataset to adapt to: its name, shard folder (train/ and val/) and input geometry."""
    name: str
    shards: Path
    size: tuple[int, int]
    batch_size: int = 16
    head_channels: int = 0  # 0: the mmdet/mmseg head width

    def config(self, top_k: Optional[int]) -> dict:
        from mthl_ds.data.reader import ShardSet
        index = ShardSet.open(self.shards / "train").index
        return {"task": index["task"], "num_classes": index["num_classes"], "shards": str(self.shards.resolve()),
                "size": list(self.size), "batch_size": self.batch_size, "top_k": top_k, "sample_weight": 1.0,
                "head_channels": self.head_channels}


def phase_recipe(source: Path, data: NewDataset, adapt: dict, top_k: Optional[int], train: dict,
                 usage: Optional[Path] = None, keep_datasets: bool = False) -> dict:
    meta = read_metadata(source)
    base = recipe_to_dict(source_recipe(meta, str(source)))
    section = {"source": str(source.resolve()), "keep_datasets": keep_datasets, **ROUTERS, **adapt}
    if usage is not None:
        section["usage"] = str(usage.resolve())
    return {"name": f"adapt_{data.name}", "description": f"adapt {source.name} to {data.name}",
            "model": base["model"], "datasets": {data.name: data.config(top_k)},
            "train": {**base["train"], "ep_size": 1, "ds_config": "stage0_fp32.json", "ckpt_every": 0,
                      "eval_every": 0, "keep_checkpoints": 1, "log_every": 10, **train},
            "adapt": section}


def run_phase(recipe_dict: dict, out: Path) -> tuple[dict, Path]:
    """Write the recipe, train it in this process (one rank), export the result. Returns (metrics, export)."""
    from mthl_ds.export import export_run
    from mthl_ds.train import Trainer
    out.mkdir(parents=True, exist_ok=True)
    recipe_path = out / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe_dict, sort_keys=False))
    recipe = load_recipe(str(recipe_path))
    results = Trainer(recipe, out / "run").run()
    return results, export_run(out / "run", out / "model.safetensors")


def run_mode(model: Path, data: NewDataset, mode: str, out: Path, train: dict, stats_images: int = 256) -> dict:
    """One Table-3 row: the mode's phases, then its figures (trainable / model parameters, FLOPs, metric)."""
    from mthl_ds.data.reader import ShardSet
    from mthl_ds.stats import routing_statistics, write_statistics
    if mode not in MODES:
        raise ConfigError(f"unknown adaptation mode {mode!r}; choose from {sorted(MODES)}")
    phases, top_k = MODES[mode]
    source, usage, results = Path(model), None, None
    for i, adapt in enumerate(phases):
        last = i == len(phases) - 1
        phase_dir = out / f"phase{i + 1}"
        recipe = phase_recipe(source, data, adapt, top_k if last else None, train, usage)
        results, source = run_phase(recipe, phase_dir)
        if not last:  # the routing statistics of the router just learned, on the new dataset's train split
            learned, _ = load_export(source)
            stats = routing_statistics(learned, {data.name: ShardSet.open(data.shards / "train")},
                                       {data.name: data.size}, max_images=stats_images)
            usage = write_statistics(stats, phase_dir / "stats")[0]
    final_recipe = load_recipe(str(out / f"phase{len(phases)}" / "recipe.yaml"))
    figures = adaptation_figures(adapted_model(final_recipe), data)
    row = {"mode": mode, "dataset": data.name, **figures,
           "metric": results[data.name]["metric"], "value": results[data.name]["value"],
           "chance": results[data.name]["chance"], "phases": len(phases), "export": str(source)}
    (out / "result.json").write_text(json.dumps(row, indent=1) + "\n")
    return row


@torch.no_grad()
def adaptation_figures(model: MTHLModel, data: NewDataset) -> dict:
    """Table 3's columns: trainable and model parameters (backbone + the dataset's head; other heads and
    routers are gone) and backbone FLOPs per image of the dataset's size (torch's counter, 2 per MAC)."""
    from torch.utils.flop_counter import FlopCounterMode
    model.eval()
    model.set_dataset(data.name)
    with FlopCounterMode(display=False) as counter:
        model.backbone(torch.zeros(1, 3, *data.size))
    return {"trainable_params": surgery.count_parameters(model, trainable_only=True),
            "model_params": surgery.count_parameters(model),
            "flops": counter.get_total_flops()}


# ------------------------------------------------------------------------------------------ the Table-3 report

def write_table(rows: list[dict], out: Path) -> Path:
    """Table 3 on the given rows (markdown, ratios against ``full``) and Fig. 3's trade-off plots."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    datasets = sorted({r["dataset"] for r in rows})
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    cell = {(r["mode"], r["dataset"]): r for r in rows}
    lines = ["| mode | " + " | ".join(f"{d} train. par. (M) | {d} model par. (M) | {d} GFLOPs | {d} "
                                      f"{next(r['metric'] for r in rows if r['dataset'] == d and 'metric' in r)}"
                                      for d in datasets) + " |",
             "|---|" + "---|---|---|---|" * len(datasets)]
    for mode in modes:
        parts = []
        for d in datasets:
            r = cell.get((mode, d))
            if r is None or "error" in r:
                parts.append("refused | | | " + (r["error"][:60] if r else ""))
                continue
            parts.append(f"{r['trainable_params'] / 1e6:.3f} | {r['model_params'] / 1e6:.3f} | "
                         f"{r['flops'] / 1e9:.3f} | {r['value']:.1f}")
        lines.append(f"| {mode} | " + " | ".join(parts) + " |")
    out.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(len(datasets), 3, figsize=(13, 3.6 * len(datasets)), squeeze=False)
    for di, d in enumerate(datasets):
        done = [r for r in rows if r["dataset"] == d and "error" not in r]
        for ai, (key, label) in enumerate((("trainable_params", "trainable parameters (M)"),
                                           ("model_params", "model parameters (M)"), ("flops", "GFLOPs per image"))):
            ax = axes[di][ai]
            scale = 1e9 if key == "flops" else 1e6
            for r in done:
                ax.scatter(r[key] / scale, r["value"])
                ax.annotate(r["mode"], (r[key] / scale, r["value"]), fontsize=7)
            ax.set_xlabel(label)
            ax.set_ylabel(f"{d} {done[0]['metric'] if done else ''}")
    fig.tight_layout()
    fig.savefig(out / "tradeoff.png", dpi=100)
    plt.close(fig)
    path = out / "table3.md"
    path.write_text("\n".join(lines) + "\n\n![trade-off](tradeoff.png)\n")
    (out / "table3.json").write_text(json.dumps(rows, indent=1) + "\n")
    return path

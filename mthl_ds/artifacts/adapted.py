"""The model a recipe trains: built from scratch, or, for a recipe with an ``adapt`` section (Sections 3.3, 3.4),
an exported model after the surgery that section asks for, frozen but for what it trains. Frozen parameters have
``requires_grad=False`` and so are never given to the optimizer (no weight decay moves them).
"""
from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import torch

from mthl_ds.artifacts import surgery
from mthl_ds.artifacts.export import load_export, read_metadata
from mthl_ds.build import build_model
from mthl_ds.config import ConfigError, Recipe, recipe_from_dict
from mthl_ds.errors import ExportError
from mthl_ds.models.mthl import MTHLModel


def build_run_model(recipe: Recipe, ep_size: int = 1, ep_rank: int = 0) -> MTHLModel:
    """The recipe's model from scratch, or, with an ``adapt`` section, the export it names after surgery, with this
    rank's share of the experts."""
    if recipe.adapt is None:
        return build_model(recipe, ep_size=ep_size, ep_rank=ep_rank)
    try:
        return surgery.shard_experts(adapted_model(recipe), ep_size, ep_rank)
    except surgery.SurgeryError as e:
        raise ConfigError(f"train.ep_size={ep_size}: {e}") from None


def resolve_source(recipe: Recipe) -> Recipe:
    """The recipe with ``model`` taken from its ``adapt.source`` export (the model is the export's)."""
    if recipe.adapt is None:
        return recipe
    try:
        model = recipe_from_dict(read_metadata(Path(recipe.adapt.source))["built_from"], recipe.adapt.source).model
    except (ExportError, ConfigError) as e:
        raise ConfigError(f"adapt.source: {e}") from None
    return dataclasses.replace(recipe, model=model)


def per_layer_usage(recipe: Recipe, name: str, layers: int) -> list[torch.Tensor]:
    from mthl_ds.analysis.stats import usage_of
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
                          "top_k": d.top_k or default_k, "aux_weight": d.aux_weight, "head_channels": d.head_channels,
                          "head_layout": d.head_layout})
        elif model.tasks[name] != d.task:
            raise ConfigError(
                f"datasets.{name}: task {d.task!r}, but the exported model's {name!r} is {model.tasks[name]!r}")
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
                    raise ConfigError(
                        f"adapt.tune_experts={a.tune_experts} but MoE layer {index} has {layer.num_experts} experts")
                tuned.append(chosen_experts(layer_usage, a.tune_experts, a.selection, recipe.train.seed * 1009 + index))
            else:
                tuned.append([])
            if a.add_experts:
                tuned[-1] += list(range(old_experts[index], layer.num_experts))
            layer.mlps.split(tuned[-1])  # the experts that train, in a bank of their own
        surgery.freeze(model, trainable_names(model, list(recipe.datasets), tuned))
    return model


def apply(model: MTHLModel, rules: list[dict]) -> None:
    try:
        surgery.apply(model, rules)
    except surgery.SurgeryError as e:
        raise ConfigError(f"adapt: {e}") from None


def trainable_names(model: MTHLModel, datasets: list[str], experts: list[list[int]]) -> list[str]:
    """The routers (MoE MLP and MoE attention) and heads of ``datasets``, the listed experts of each MoE layer,
    and every adapter; in the model's ``named_parameters()`` order."""
    chosen = [p for n in datasets if n in model.heads for p in model.heads[n].parameters()]
    for layer, ids in zip(model.backbone.moe_layers, experts):
        chosen += [p for n in datasets for _, p in layer.router_parameters(n)]
        chosen += [p for _, p in layer.expert_parameters(ids)]
        chosen += list(layer.adapter.parameters()) if layer.adapter is not None else []
    for layer in model.backbone.attention_layers:
        chosen += [p for n in datasets for _, p in layer.router_parameters(n)]
    wanted = {id(p) for p in chosen}
    return [n for n, p in model.named_parameters() if id(p) in wanted]

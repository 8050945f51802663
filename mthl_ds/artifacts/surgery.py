"""Model surgery: the structural changes adaptation makes to a trained model, as a list of rules applied in one
place (vmoe's checkpoint surgery). Each rule is a JSON-able dict; a model records the rules applied to it
(``model.surgery``), and an export carries that list, so loading an export replays it on the freshly built
source model before the weights are loaded. Rules run on the single-device model (ep_size 1);
:func:`shard_experts` then cuts it for expert parallelism.

    {"op": "add_dataset", "name", "task", "num_classes", "top_k", "aux_weight", "head_channels", "head_layout"}
        a router in every MoE layer and MoE attention layer (a new row of B(D, E)) and a head (a rule without
        head_layout was written before it: "torchvision")
    {"op": "drop_dataset", "name"}     its routers and head go; its row of B(D, E) stays for the MI loss
    {"op": "set_top_k", "name", "k"}
    {"op": "keep_experts", "kept": [[...] per MoE layer]}   pruning: routers are re-indexed
    {"op": "add_experts", "count", "seed"}    continual learning: old routers never select the new experts
    {"op": "add_adapters", "reduction"}       the adapter baseline: bottleneck dim // reduction after each MoE MLP
"""
from __future__ import annotations

from typing import Iterable

import torch

from mthl_ds.build import build_model
from mthl_ds.config import ConfigError, DatasetConfig, recipe_from_dict
from mthl_ds.errors import ExportError
from mthl_ds.models.backbone import mlp_blocks
from mthl_ds.models.mthl import MTHLModel
from mthl_ds.moe.layer import Adapter, MoEMlp
from mthl_ds.tasks import task_spec


class SurgeryError(ValueError):
    """A rule that cannot be applied to this model; the message names the rule and the value at fault."""


def apply(model: MTHLModel, rules: Iterable[dict]) -> MTHLModel:
    """Apply ``rules`` in order and append them to ``model.surgery``."""
    for rule in rules:
        rule = dict(rule)
        op = rule.pop("op", None)
        if op not in RULES:
            raise SurgeryError(f"unknown surgery op {op!r}; known: {sorted(RULES)}")
        try:
            RULES[op](model, **rule)
        except (TypeError, ValueError, KeyError) as e:
            raise SurgeryError(f"surgery {op} {rule}: {e}") from None
        model.surgery.append({"op": op, **rule})
    return model


def add_dataset(model: MTHLModel, name: str, task: str, num_classes: int, top_k: int, aux_weight: float = 0.4,
                head_channels: int = 0, head_layout: str = "torchvision") -> None:
    if name in model.heads:
        raise ValueError(f"the model already has a dataset {name!r}")
    for layer in model.backbone.moe_layers:
        layer.gate.add_router(name, top_k)
    for layer in model.backbone.attention_layers:  # MoE attention keeps its own K
        layer.gate.add_router(name, model.built_from["model"]["moe"]["attention"]["top_k"])
    dataset = DatasetConfig(task, num_classes=num_classes, aux_weight=aux_weight, head_channels=head_channels,
                            head_layout=head_layout)
    model.heads[name] = task_spec(task).build_head(model.backbone.stage_channels, dataset)
    model.tasks[name] = task
    model.backbone.datasets.append(name)


def drop_dataset(model: MTHLModel, name: str) -> None:
    if name not in model.heads:
        raise ValueError(f"the model has no dataset {name!r}; it has {sorted(model.heads)}")
    for gate in model.backbone.gates:
        gate.remove_router(name)
    del model.heads[name]
    del model.tasks[name]
    model.backbone.datasets.remove(name)


def set_top_k(model: MTHLModel, name: str, k: int) -> None:
    gates = [layer.gate for layer in model.backbone.moe_layers]
    for index, gate in enumerate(gates):  # check every layer before changing any
        selectable = len(gate.routers[name].selectable())
        if not 1 <= k <= selectable:
            raise ValueError(f"MoE layer {index}: top_k={k} for {name!r} must be between 1 and its {selectable} "
                             "selectable experts")
    for gate in gates:
        gate.set_top_k(name, k)


def keep_experts(model: MTHLModel, kept: list[list[int]]) -> None:
    layers = model.backbone.moe_layers
    if len(kept) != len(layers):
        raise ValueError(f"kept lists {len(kept)} layers, the model has {len(layers)} MoE layers")
    for index, (layer, experts) in enumerate(zip(layers, kept)):  # check every layer before changing any
        try:
            layer.check_kept(list(experts))
        except ValueError as e:
            raise ValueError(f"MoE layer {index}: {e}") from None
    for layer, experts in zip(layers, kept):
        layer.keep_experts(list(experts))


def add_experts(model: MTHLModel, count: int, seed: int = 0) -> None:
    if count < 1:
        raise ValueError(f"count={count} must be >= 1")
    for index, layer in enumerate(model.backbone.moe_layers):
        layer.add_experts(count, seed * 1009 + index)


def add_adapters(model: MTHLModel, reduction: int) -> None:
    if reduction < 1:
        raise ValueError(f"reduction={reduction} must be >= 1")
    for layer in model.backbone.moe_layers:
        layer.adapter = Adapter(layer.dim, max(1, layer.dim // reduction))


RULES = {"add_dataset": add_dataset, "drop_dataset": drop_dataset, "set_top_k": set_top_k,
         "keep_experts": keep_experts, "add_experts": add_experts, "add_adapters": add_adapters}


def rebuild(meta: dict, where: str) -> MTHLModel:
    """The single-device model a checkpoint's or an export's metadata describes (``built_from``, the recipe, and the
    ``surgery`` rules applied since), freshly initialised: nanoGPT's "a checkpoint carries the model's arguments"."""
    try:
        recipe = recipe_from_dict(meta["built_from"], where)
    except ConfigError as e:
        raise ExportError(str(e)) from None
    return apply(build_model(recipe), meta["surgery"])


@torch.no_grad()
def shard_experts(model: MTHLModel, ep_size: int, ep_rank: int) -> MTHLModel:
    """Cut the single-device model for expert parallelism: each MoE layer keeps experts
    ``ep_rank * E/ep_size ..`` as a new ``MoEMlp`` with ``ep_size`` (weights and ``requires_grad`` carried)."""
    if ep_size == 1:
        return model
    owners = {id(block.mlp): block for block in mlp_blocks(model.backbone.net)}
    for index, layer in enumerate(model.backbone.moe_layers):
        if layer.num_experts % ep_size:
            raise SurgeryError(f"MoE layer {index} has {layer.num_experts} experts, not divisible by ep_size={ep_size}")
        local = layer.num_experts // ep_size
        sharded = MoEMlp(layer.dim, layer.hidden, layer.num_experts, layer.gate, ep_size=ep_size,
                         act_layer=layer.act_layer, dispatch=layer.dispatch)
        sharded.mlps.take(layer.mlps, ep_rank * local)
        sharded.adapter = layer.adapter
        owners[id(layer)].mlp = sharded
        model.backbone.moe_layers[index] = sharded
    return model


def freeze(model: MTHLModel, trainable: Iterable[str]) -> None:
    """``requires_grad`` only for the parameters named in ``trainable``."""
    names = set(trainable)
    unknown = names - {n for n, _ in model.named_parameters()}
    if unknown:
        raise SurgeryError(f"no such parameters: {sorted(unknown)[:5]}")
    for name, param in model.named_parameters():
        param.requires_grad_(name in names)


"""Parameter and FLOPs figures of a recipe's model and of its dense twin (MTHL.D)."""
from __future__ import annotations

import dataclasses

import torch
from torch.utils.flop_counter import FlopCounterMode

from mthl_ds.config import Recipe
from mthl_ds.build import build_model
from mthl_ds.models.mthl import MTHLModel


def count(params) -> int:
    return sum(p.numel() for p in params)


def active_params(model: MTHLModel, dataset: str) -> int:
    """Parameters one image of ``dataset`` can touch: all but other heads, other routers and unchosen experts."""
    total = count(model.parameters())
    unused = sum(count(h.parameters()) for name, h in model.heads.items() if name != dataset)
    for layer in model.backbone.moe_layers:
        gate = layer.gate
        unused += sum(count(r.parameters()) for name, r in gate.routers.items() if name != dataset)
        per_mlp = count(layer.local_mlps[0].parameters())
        unused += (layer.num_experts - gate.top_k[dataset]) * per_mlp
    for layer in model.backbone.attention_layers:  # an attention expert: its query and output projection slices
        unused += sum(count(r.parameters()) for name, r in layer.gate.routers.items() if name != dataset)
        per_head = layer.head_dim * (2 * layer.dim + (layer.query.bias is not None))
        unused += (layer.num_experts - layer.gate.top_k[dataset]) * per_head
    return total - unused


@torch.no_grad()
def backbone_flops(model: MTHLModel, dataset: str, img_size: int) -> int:
    """FLOPs (torch's counter: 2 per multiply-add) of one image through the backbone, eval mode."""
    model.eval()
    model.set_dataset(dataset)
    with FlopCounterMode(display=False) as counter:
        model.backbone(torch.zeros(1, 3, img_size, img_size))
    return counter.get_total_flops()


def figures(model: MTHLModel, recipe: Recipe) -> dict:
    size = recipe.model.img_size
    return {
        "backbone_params": count(model.backbone.parameters()),
        "total_params": count(model.parameters()),
        "active_params": {d: active_params(model, d) for d in recipe.datasets},
        "flops_per_image": {d: backbone_flops(model, d, size) for d in recipe.datasets},
        "moe_layers": len(model.backbone.moe_layers),
    }


def dense_twin(recipe: Recipe) -> Recipe:
    """The recipe with every MoE MLP replaced by the dense MLP it was FLOPs-matched to (MTHL.D)."""
    return dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, moe=None))


def model_info(recipe: Recipe) -> dict:
    info = figures(build_model(recipe), recipe)
    if recipe.model.moe is None:
        info["dense"] = dict(info)
    else:
        dense = dense_twin(recipe)
        info["dense"] = figures(build_model(dense), dense)
    return info


def format_info(name: str, info: dict) -> str:
    m = lambda n: f"{n / 1e6:.2f}M"  # noqa: E731
    g = lambda n: f"{n / 1e9:.2f} GFLOPs ({n / 2e9:.2f} GMACs)"  # noqa: E731
    lines = [f"recipe {name}"]
    for label, fig in (("MoE model", info), ("dense twin", info["dense"])):
        lines += [f"  {label}:", f"    MoE layers         {fig['moe_layers']}",
                  f"    backbone params    {m(fig['backbone_params'])}",
                  f"    total params       {m(fig['total_params'])} (backbone + all heads)"]
        for d in fig["active_params"]:
            lines.append(f"    {d:<18} active {m(fig['active_params'][d])}, backbone {g(fig['flops_per_image'][d])}"
                         f" per image")
    return "\n".join(lines)

"""Parameter and FLOPs figures of a recipe's model and of its dense twin (MTHL.D)."""
from __future__ import annotations

import dataclasses

from mthl_ds.build import build_model
from mthl_ds.config import Recipe
from mthl_ds.models.counting import count_parameters, image_flops
from mthl_ds.models.mthl import MTHLModel


def other_routers(layer, dataset: str) -> int:
    """Parameters of the routers of ``layer`` (an MoE MLP or MoE attention) that are not ``dataset``'s."""
    return sum(count_parameters(p for _, p in layer.router_parameters(name))
               for name in layer.gate.routers if name != dataset)


def active_params(model: MTHLModel, dataset: str) -> int:
    """Parameters one image of ``dataset`` can touch: all but other heads, other routers and unchosen experts."""
    total = count_parameters(model)
    unused = sum(count_parameters(h) for name, h in model.heads.items() if name != dataset)
    for layer in model.backbone.moe_layers:
        unused += other_routers(layer, dataset)
        per_mlp = count_parameters(p for _, p in layer.expert_parameters()) // layer.num_local_experts
        unused += (layer.num_experts - layer.gate.top_k[dataset]) * per_mlp
    for layer in model.backbone.attention_layers:  # an attention expert: its query and output projection slices
        unused += other_routers(layer, dataset)
        per_head = layer.head_dim * (2 * layer.dim + (layer.query.bias is not None))
        unused += (layer.num_experts - layer.gate.top_k[dataset]) * per_head
    return total - unused


def figures(model: MTHLModel, recipe: Recipe) -> dict:
    """Parameters (backbone, all, active per dataset) and backbone FLOPs of one image at ``model.img_size`` (torch's
    counter: 2 per multiply-add, eval mode)."""
    size = recipe.model.img_size
    return {
        "backbone_params": count_parameters(model.backbone),
        "total_params": count_parameters(model),
        "active_params": {d: active_params(model, d) for d in recipe.datasets},
        "flops_per_image": {d: image_flops(model, d, (size, size)) for d in recipe.datasets},
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

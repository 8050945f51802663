"""From a recipe to its model: the MoE backbone, and each dataset's head as its task kind builds it."""
from __future__ import annotations

from mthl_ds.config import Recipe, recipe_to_dict
from mthl_ds.models.backbone import build_backbone
from mthl_ds.models.mthl import MTHLModel
from mthl_ds.tasks import task_spec


def build_model(recipe: Recipe, ep_size: int = 1, ep_rank: int = 0) -> MTHLModel:
    """Build the recipe's model; the same seed gives the same weights on every rank and for any ep_size. A recipe
    read back from a checkpoint or an export has no ``model.init_from`` (``config.recipe_from_dict`` clears it)."""
    m = recipe.model
    backbone = build_backbone(m.backbone, recipe.datasets, m.moe, top_k=recipe.top_k_per_dataset() or None,
                              img_size=m.img_size, drop_path_rate=m.drop_path_rate, ep_size=ep_size,
                              ep_rank=ep_rank, seed=recipe.train.seed,
                              init_from=m.init_from)
    heads = {name: task_spec(d.task).build_head(backbone.stage_channels, d) for name, d in recipe.datasets.items()}
    if m.grad_checkpointing:
        backbone.set_grad_checkpointing(True)
    model = MTHLModel(backbone, heads, {name: d.task for name, d in recipe.datasets.items()})
    model.built_from = recipe_to_dict(recipe)
    return model

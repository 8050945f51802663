"""The multi-task heterogeneous learner: one shared backbone, one head and one router per dataset."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from mthl_ds.config import Recipe, recipe_to_dict
from mthl_ds.models.backbone import MoEBackbone, build_backbone
from mthl_ds.models.heads import build_head


class MTHLModel(nn.Module):
    """Shared backbone + ``heads[dataset]``. Datasets and their tasks come from the recipe."""

    def __init__(self, backbone: MoEBackbone, heads: dict[str, nn.Module], tasks: dict[str, str]):
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleDict(heads)
        self.tasks = dict(tasks)
        self.built_from: dict = {}  # the recipe (as a dict) the model was built from, before any surgery
        self.surgery: list[dict] = []  # mthl_ds.surgery rules applied since, in order

    @property
    def dtype(self) -> torch.dtype:
        """The dtype inputs are given in: the weights' (float16 / bfloat16 once DeepSpeed casts the model)."""
        return next(p.dtype for p in self.parameters() if p.is_floating_point())

    @property
    def dataset(self) -> str | None:
        return self.backbone.context.dataset

    def set_dataset(self, name: str) -> None:
        self.backbone.set_dataset(name)

    def forward(self, images: Tensor):
        features = self.backbone(images)
        return self.heads[self.dataset](features)


def build_model(recipe: Recipe, ep_size: int = 1, ep_rank: int = 0) -> MTHLModel:
    """Build the recipe's model; the same seed gives the same weights on every rank and for any ep_size. A recipe
    read back from a checkpoint or an export has no ``model.init_from`` (``config.recipe_from_dict`` clears it)."""
    m = recipe.model
    backbone = build_backbone(m.backbone, recipe.datasets, m.moe, top_k=recipe.top_k_per_dataset() or None,
                              img_size=m.img_size, drop_path_rate=m.drop_path_rate, ep_size=ep_size,
                              ep_rank=ep_rank, seed=recipe.train.seed,
                              init_from=m.init_from)
    heads = {name: build_head(d.task, backbone.stage_channels, d.num_classes, d.aux_weight, d.head_channels)
             for name, d in recipe.datasets.items()}
    if m.grad_checkpointing:
        backbone.set_grad_checkpointing(True)
    model = MTHLModel(backbone, heads, {name: d.task for name, d in recipe.datasets.items()})
    model.built_from = recipe_to_dict(recipe)
    return model

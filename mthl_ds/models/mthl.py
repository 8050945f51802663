"""The multi-task heterogeneous learner: one shared backbone, one head and one router per dataset."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from mthl_ds.models.backbone import MoEBackbone


class MTHLModel(nn.Module):
    """Shared backbone + ``heads[dataset]``. Datasets and their tasks come from the recipe."""

    def __init__(self, backbone: MoEBackbone, heads: dict[str, nn.Module], tasks: dict[str, str]):
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleDict(heads)
        self.tasks = dict(tasks)
        self.built_from: dict = {}  # the recipe (as a dict) the model was built from, before any surgery
        self.surgery: list[dict] = []  # mthl_ds.artifacts.surgery rules applied since, in order

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

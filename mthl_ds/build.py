"""From a recipe to its model: the MoE backbone, and each dataset's head as its task kind builds it; and the loss
the recipe trains that model with."""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

from torch import Tensor

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


class TrainingLoss(NamedTuple):
    """One step's loss and what it is made of."""
    loss: Tensor  # what backward runs on: loss_weight x task loss + router losses
    task_loss: Tensor  # the head's loss, unweighted (what the metrics log)
    parts: dict  # the head's named loss terms (detached)


def training_loss(model: MTHLModel, recipe: Recipe, name: str, batch: dict, output=None,
                  reduce_mean: Optional[Callable[[Tensor], Tensor]] = None) -> TrainingLoss:
    """The training loss of one batch of dataset ``name``: its task loss times ``datasets.<name>.loss_weight``
    plus the router losses of this forward (every gate's, weighted by its ``loss_coefs``).

    Args:
        model: the recipe's model, its dataset already set to ``name`` (``model.set_dataset``).
        recipe: gives the dataset's loss weight.
        name: the dataset of the batch.
        batch: the batch (``image`` and the task's targets), on the model's device.
        output: the forward's output when the caller ran it (e.g. through a DeepSpeed engine); else
            ``model(batch["image"])`` here.
        reduce_mean: averages a tensor over the data-parallel ranks, for the task losses whose normaliser is
            global (detection's positive anchors); None on one process.
    """
    output = model(batch["image"]) if output is None else output
    task_loss, parts = model.heads[name].loss(output, batch, reduce_mean=reduce_mean)
    loss = recipe.datasets[name].loss_weight * task_loss + model.backbone.router_loss()
    return TrainingLoss(loss, task_loss, parts)

"""Semantic segmentation: UperNet with its FCN auxiliary head, mIoU, a class-id mask as a prediction."""
from __future__ import annotations

import torch

from mthl_ds.analysis.metrics import SegmentationEvaluator
from mthl_ds.models.heads import UperNetSegmentationHead, sync_batchnorm
from mthl_ds.tasks.spec import TaskSpec


def masks_to_cpu(masks: list[torch.Tensor]) -> list[torch.Tensor]:
    """Masks of different sizes on the CPU in one copy for the batch (one host sync, not one per image)."""
    flat = torch.cat([m.flatten() for m in masks]).cpu()
    return [part.view(m.shape) for part, m in zip(flat.split([m.numel() for m in masks]), masks)]


def chance_level(evaluator: SegmentationEvaluator, num_classes: int, reduce_sum) -> float:
    return evaluator.chance_miou(reduce_sum(evaluator.confusion).sum(1).cpu().numpy())


def protocol(shard_set, annotations, original: bool) -> str:
    return "mIoU at the original resolution" if original else "mIoU at the crop-canvas scale (the trainer's)"


def fake_targets(num_classes: int, batch_size: int, shape, gen: torch.Generator) -> dict:
    return {"mask": torch.randint(0, num_classes, (batch_size, *shape), generator=gen)}


SPEC = TaskSpec(
    kind="segmentation",
    build_head=lambda channels, d: sync_batchnorm(UperNetSegmentationHead(
        channels, d.num_classes, channels=d.head_channels or 512, aux_weight=d.aux_weight)),
    make_evaluator=lambda num_classes, shard_set, truth, device: SegmentationEvaluator(num_classes, device),
    chance_level=chance_level,
    protocol=protocol,
    output_to_cpu=masks_to_cpu,
    prediction=lambda mask, classes: {"mask": mask.to(torch.uint8).numpy()},
    fake_targets=fake_targets,
)

"""Image classification: a pooled linear head, top-1 / top-5, and the top-5 classes as a prediction."""
from __future__ import annotations

import torch

from mthl_ds.analysis.metrics import ClassificationEvaluator
from mthl_ds.models.heads import ClassificationHead
from mthl_ds.tasks.spec import TaskSpec, class_name


def prediction(logits: torch.Tensor, classes) -> dict:
    probs = logits.float().softmax(-1)
    top = probs.topk(min(5, len(probs)))
    return {"top5": [{"label": int(i), "name": class_name(classes, int(i)), "score": float(p)}
                     for p, i in zip(top.values, top.indices)]}


def fake_targets(num_classes: int, batch_size: int, shape, gen: torch.Generator) -> dict:
    return {"label": torch.randint(0, num_classes, (batch_size,), generator=gen)}


SPEC = TaskSpec(
    kind="classification",
    build_head=lambda channels, d: ClassificationHead(channels, d.num_classes),
    make_evaluator=lambda num_classes, shard_set, truth, device: ClassificationEvaluator(device),
    chance_level=lambda evaluator, num_classes, reduce_sum: ClassificationEvaluator.chance(num_classes),
    protocol=lambda shard_set, annotations, original: "top-1 / top-5, timm's eval transform",
    output_to_cpu=lambda logits: logits.cpu(),
    prediction=prediction,
    fake_targets=fake_targets,
)

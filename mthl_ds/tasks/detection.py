"""Object detection: RetinaNet, COCO bbox AP (or VOC mAP for VOC-style shard sets), boxes as a prediction."""
from __future__ import annotations

import torch

from mthl_ds.analysis.metrics import CHANCE_MAP, DetectionEvaluator, detections_to_cpu
from mthl_ds.models.heads import RetinaNetDetectionHead
from mthl_ds.tasks.spec import TaskSpec, class_name


def protocol(shard_set, annotations, original: bool) -> str:
    metric = (f"VOC mAP at IoU 0.5 ({shard_set.index['voc_ap']})" if shard_set.index.get("metric") == "voc"
              else "COCO bbox AP")  # as DetectionEvaluator.result
    return f"{metric} against " + (str(annotations) if annotations else "the ground truth in the shards")


def prediction(out: dict, classes) -> dict:
    """Boxes as COCO's [x, y, w, h] in the original image, with scores, labels, COCO category ids and names."""
    boxes = out["boxes"].clone()
    boxes[:, 2:] -= boxes[:, :2]
    labels = out["labels"].tolist()
    classes = classes or []
    ids = [classes[label]["id"] if classes and isinstance(classes[label], dict) else label for label in labels]
    return {"boxes": [[round(v, 2) for v in b] for b in boxes.tolist()], "scores": out["scores"].tolist(),
            "labels": labels, "category_ids": ids, "names": [class_name(classes, label) for label in labels]}


def fake_targets(num_classes: int, batch_size: int, shape, gen: torch.Generator) -> dict:
    """Three boxes per image, each a third of the canvas wide and high, inside it."""
    h, w = shape
    corners = torch.rand(batch_size, 3, 2, generator=gen) * torch.tensor([w / 2, h / 2])
    return {"boxes": list(torch.cat([corners, corners + torch.tensor([w / 3, h / 3])], dim=2)),
            "labels": list(torch.randint(0, num_classes, (batch_size, 3), generator=gen))}


SPEC = TaskSpec(
    kind="detection",
    build_head=lambda channels, d: RetinaNetDetectionHead(channels, d.num_classes,
                                                          fpn_channels=d.head_channels or 256, layout=d.head_layout),
    make_evaluator=lambda num_classes, shard_set, truth, device: DetectionEvaluator(shard_set, truth),
    chance_level=lambda evaluator, num_classes, reduce_sum: CHANCE_MAP,
    protocol=protocol,
    output_to_cpu=detections_to_cpu,
    prediction=prediction,
    fake_targets=fake_targets,
)

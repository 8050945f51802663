"""Evaluation: each rank evaluates its share of the val shards; counts are summed and detections gathered,
so the result is identical to a one-rank evaluation. Padding samples (``valid == False``) never count."""
from __future__ import annotations

import contextlib
import io
import json
from typing import Callable, Optional

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mthl_ds.data.reader import ShardSet, read_shard
from mthl_ds.data.pipelines import IGNORE_INDEX

ReduceSum = Callable[[torch.Tensor], torch.Tensor]
Gather = Callable[[list], list]


class ClassificationEvaluator:
    metric = "top1"

    def __init__(self):
        self.counts = torch.zeros(3, dtype=torch.float64)  # top-1 hits, top-5 hits, samples

    def update(self, logits: torch.Tensor, batch: dict) -> None:
        valid = batch["valid"]
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top5 == batch["label"][:, None]
        self.counts += torch.tensor([float(hits[:, 0][valid].sum()), float(hits.any(1)[valid].sum()),
                                     float(valid.sum())], dtype=torch.float64)

    def result(self, reduce_sum: ReduceSum, gather: Gather) -> dict:
        top1, top5, n = reduce_sum(self.counts).tolist()
        return {"top1": 100 * top1 / max(n, 1), "top5": 100 * top5 / max(n, 1), "samples": int(n)}

    @staticmethod
    def chance(num_classes: int) -> float:
        return 100.0 / num_classes


class SegmentationEvaluator:
    """mIoU / mAcc / aAcc from a confusion matrix, as mmseg computes them (classes absent from both
    prediction and ground truth are left out of the means)."""
    metric = "mIoU"

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.float64)

    def update(self, prediction: torch.Tensor, batch: dict) -> None:
        target = batch["mask"][batch["valid"]]
        prediction = prediction[batch["valid"]]
        keep = target != IGNORE_INDEX
        index = target[keep] * self.num_classes + prediction[keep]
        self.confusion += torch.bincount(index, minlength=self.num_classes ** 2).reshape(
            self.num_classes, self.num_classes).double()

    @staticmethod
    def metrics(confusion: torch.Tensor) -> dict:
        conf = confusion.numpy()
        diag, gt, pred = np.diag(conf), conf.sum(1), conf.sum(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = diag / (gt + pred - diag)
            acc = diag / gt
        return {"mIoU": 100 * float(np.nanmean(iou)), "mAcc": 100 * float(np.nanmean(acc)),
                "aAcc": 100 * float(diag.sum() / max(conf.sum(), 1)), "pixels": int(conf.sum())}

    def result(self, reduce_sum: ReduceSum, gather: Gather) -> dict:
        return self.metrics(reduce_sum(self.confusion))

    @staticmethod
    def chance_miou(class_pixels: np.ndarray) -> float:
        """mIoU of a predictor that picks a class uniformly at random for every pixel."""
        p = class_pixels / class_pixels.sum()
        c = len(p)
        iou = (p / c) / (p + 1 / c - p / c)
        return 100 * float(iou[class_pixels > 0].mean())


def coco_ground_truth(shard_set: ShardSet) -> dict:
    """The COCO ground truth of a detection val shard set, rebuilt from the shards' JSON."""
    images, annotations = [], []
    for shard in shard_set.shards:
        for _, members in read_shard(shard_set.root / shard["name"], shard["num_samples"])[0]:
            meta = json.loads(members["json"])
            images.append({"id": meta["image_id"], "width": meta["width"], "height": meta["height"],
                           "file_name": meta["file_name"]})
            for box, cat, crowd, area, ann_id in zip(meta["boxes"], meta["category_ids"], meta["iscrowd"],
                                                     meta["areas"], meta["ann_ids"]):
                annotations.append({"id": ann_id, "image_id": meta["image_id"], "category_id": cat, "bbox": box,
                                    "area": area, "iscrowd": crowd})
    return {"images": images, "annotations": annotations, "categories": shard_set.index["classes"]}


def coco_map(ground_truth: dict, detections: list[dict]) -> dict:
    """COCO bbox AP through pycocotools; ``detections`` in COCO results format."""
    if not detections:
        return {"mAP": 0.0, "AP50": 0.0, "AP75": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = json.loads(json.dumps(ground_truth))
        gt.createIndex()
        evaluator = COCOeval(gt, gt.loadRes(detections), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = evaluator.stats
    return {"mAP": 100 * float(stats[0]), "AP50": 100 * float(stats[1]), "AP75": 100 * float(stats[2])}


class DetectionEvaluator:
    metric = "mAP"

    def __init__(self, shard_set: ShardSet):
        self.shard_set = shard_set
        self.category_ids = [c["id"] for c in shard_set.index["classes"]]
        self.detections: list[dict] = []

    def update(self, predictions: list[dict], batch: dict) -> None:
        for det, image_id, valid in zip(predictions, batch["image_id"].tolist(), batch["valid"].tolist()):
            if not valid:
                continue
            boxes = det["boxes"].clone()
            boxes[:, 2:] -= boxes[:, :2]
            for box, score, label in zip(boxes.tolist(), det["scores"].tolist(), det["labels"].tolist()):
                self.detections.append({"image_id": image_id, "category_id": self.category_ids[label],
                                        "bbox": [round(v, 3) for v in box], "score": round(score, 5)})

    def result(self, reduce_sum: ReduceSum, gather: Gather) -> dict:
        detections = [d for part in gather(self.detections) for d in part]
        detections.sort(key=lambda d: (d["image_id"], -d["score"], d["category_id"], d["bbox"]))
        return {**coco_map(coco_ground_truth(self.shard_set), detections), "detections": len(detections)}


def make_evaluator(task: str, num_classes: int, shard_set: Optional[ShardSet]):
    if task == "classification":
        return ClassificationEvaluator()
    if task == "segmentation":
        return SegmentationEvaluator(num_classes)
    return DetectionEvaluator(shard_set)

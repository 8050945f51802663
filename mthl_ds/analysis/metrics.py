"""The metrics: accumulators that each rank fills with its share of a val set, then reduce over the ranks
(counts summed, detections gathered), so the result is identical to a one-rank evaluation. Padding samples
(``valid == False``) never count.

Classification: top-1 / top-5. Detection: COCO bbox AP (pycocotools), or VOC mAP at IoU 0.5 for VOC-style
shard sets, on boxes mapped back to the original image. Segmentation: mIoU / mAcc / aAcc from a confusion
matrix, as mmseg computes them.

Devices. The classification counts and the segmentation confusion matrix live on the model's device; they are
built with static shapes (no boolean-mask indexing, no ``bincount``, whose output size is read on the host) and
read back once, at the end. Detections come back to the CPU once per batch.
"""
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
from mthl_ds.geometry import IGNORE_INDEX
from mthl_ds.runtime.device import DeviceLike

ReduceSum = Callable[[torch.Tensor], torch.Tensor]
CHANCE_MAP = 0.0  # a detector that guesses has an AP of (almost) zero
Gather = Callable[[list], list]


class ClassificationEvaluator:
    metric = "top1"
    device_keys = ("label", "valid")  # what update reads on the device

    def __init__(self, device: DeviceLike = "cpu"):
        self.counts = torch.zeros(3, dtype=torch.float64, device=device)  # top-1 hits, top-5 hits, samples

    def update(self, logits: torch.Tensor, batch: dict) -> None:
        """Counts of this batch, added on the device; padding samples are masked out with ``& valid``, not indexed
        away, so the shapes stay static."""
        valid = batch["valid"]
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top5 == batch["label"][:, None]
        self.counts += torch.stack([hits[:, 0] & valid, hits.any(1) & valid, valid]).sum(1, dtype=torch.float64)

    def result(self, reduce_sum: ReduceSum, gather: Gather) -> dict:
        top1, top5, n = reduce_sum(self.counts).tolist()
        return {"top1": 100 * top1 / max(n, 1), "top5": 100 * top5 / max(n, 1), "samples": int(n)}

    @staticmethod
    def chance(num_classes: int) -> float:
        return 100.0 / num_classes


class SegmentationEvaluator:
    """mIoU / mAcc / aAcc from a confusion matrix, as mmseg computes them (classes absent from both
    prediction and ground truth are left out of the means).

    The matrix is accumulated on the device as a flat float64 vector of ``C * C + 1`` cells: pixel (target t,
    prediction p) adds one to cell ``t * C + p``, and an ignored pixel or a padding sample's to the last cell,
    which is never read. One ``index_add_`` per batch with static shapes: no boolean-mask indexing and no
    ``torch.bincount``, both of which make CUDA wait for the host to size their output."""
    metric = "mIoU"
    device_keys = ("mask", "mask_original", "valid")

    def __init__(self, num_classes: int, device: DeviceLike = "cpu"):
        self.num_classes = num_classes
        self.counts = torch.zeros(num_classes * num_classes + 1, dtype=torch.float64, device=device)
        self.one = torch.ones((), dtype=torch.float64, device=device)

    @property
    def confusion(self) -> torch.Tensor:
        """(C, C) float64 counts, rows ground truth, columns prediction (a view of the accumulator)."""
        return self.counts[:-1].view(self.num_classes, self.num_classes)

    def cells(self, target: torch.Tensor, prediction: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Each pixel's cell of the flat matrix: ``target * C + prediction``, or the last cell where the target is
        ignored or the sample is padding (``valid`` False; broadcast against the pixels)."""
        c = self.num_classes
        return torch.where((target != IGNORE_INDEX) & valid, target * c + prediction, c * c).flatten()

    def update(self, prediction, batch: dict) -> None:
        """``prediction``: (B, H, W) at the canvas scale against ``batch["mask"]``, or a list of masks at the
        original sizes against ``batch["mask_original"]``; both on the accumulator's device, as ``batch["valid"]``."""
        valid = batch["valid"]
        if isinstance(prediction, list):
            index = torch.cat([self.cells(t, p, v) for t, p, v in zip(batch["mask_original"], prediction, valid)])
        else:
            index = self.cells(batch["mask"], prediction, valid.view(-1, 1, 1))
        self.counts.index_add_(0, index, self.one.expand(index.numel()))

    @staticmethod
    def metrics(confusion: torch.Tensor) -> dict:
        conf = confusion.cpu().numpy()
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


def voc_ap(recall: np.ndarray, precision: np.ndarray, method: str) -> float:
    """VOC's AP of one class from its precision/recall curve: ``11point`` (VOC2007: the mean over recall
    thresholds 0, 0.1, ..., 1 of the best precision at that recall or above) or ``area`` (VOC2010 on: the area
    under the curve made monotone)."""
    if method == "11point":
        return float(np.mean([precision[recall >= t].max() if (recall >= t).any() else 0.0
                              for t in np.linspace(0, 1, 11)]))
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    changes = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[changes + 1] - mrec[changes]) * mpre[changes + 1]))


def voc_map(ground_truth: dict, detections: list[dict], method: str, iou_threshold: float = 0.5) -> dict:
    """PASCAL VOC mAP at IoU 0.5, as the VOC devkit: per class, detections by descending score; each takes the
    ground-truth box of its image it overlaps most: a true positive if IoU >= 0.5 and that box is not matched yet,
    else a false positive; on a ``difficult`` box (``iscrowd`` in ``ground_truth``, as the VOC converter writes it)
    it counts as neither, and difficult boxes are not positives. Classes without a positive are left out of the
    mean (as mmdet's eval_map). Boxes are continuous xywh: IoU without the devkit's +1 on integer pixel boxes
    (the converter already turned VOC's inclusive pixel boxes into spans)."""
    def xyxy(b):
        return np.array([b[0], b[1], b[0] + b[2], b[1] + b[3]], dtype=np.float64)

    aps = {}
    for category in ground_truth["categories"]:
        cid = category["id"]
        truth: dict[int, list] = {}
        for ann in ground_truth["annotations"]:
            if ann["category_id"] == cid:
                truth.setdefault(ann["image_id"], []).append((xyxy(ann["bbox"]), bool(ann["iscrowd"])))
        positives = sum(not hard for boxes in truth.values() for _, hard in boxes)
        if positives == 0:
            continue
        matched = {image: np.zeros(len(boxes), bool) for image, boxes in truth.items()}
        dets = sorted((d for d in detections if d["category_id"] == cid), key=lambda d: -d["score"])
        tp, fp = np.zeros(len(dets)), np.zeros(len(dets))
        for i, det in enumerate(dets):
            boxes = truth.get(det["image_id"], [])
            if not boxes:
                fp[i] = 1
                continue
            d = xyxy(det["bbox"])
            g = np.stack([b for b, _ in boxes])
            inter = (np.clip(np.minimum(g[:, 2], d[2]) - np.maximum(g[:, 0], d[0]), 0, None)
                     * np.clip(np.minimum(g[:, 3], d[3]) - np.maximum(g[:, 1], d[1]), 0, None))
            union = (g[:, 2] - g[:, 0]) * (g[:, 3] - g[:, 1]) + (d[2] - d[0]) * (d[3] - d[1]) - inter
            iou = inter / np.maximum(union, 1e-12)
            j = int(iou.argmax())
            if iou[j] < iou_threshold:
                fp[i] = 1
            elif boxes[j][1]:
                continue  # on a difficult box: ignored
            elif not matched[det["image_id"]][j]:
                tp[i], matched[det["image_id"]][j] = 1, True
            else:
                fp[i] = 1  # a second detection of a matched box
        tp, fp = np.cumsum(tp), np.cumsum(fp)
        recall = tp / positives
        precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
        aps[category["name"]] = 100 * voc_ap(recall, precision, method)
    value = float(np.mean(list(aps.values()))) if aps else 0.0
    return {"mAP": value, "AP50": value, "ap_method": f"voc_{method}", "per_class_ap": aps}


def detections_to_cpu(detections: list[dict]) -> list[dict]:
    """Per-image detections (``boxes`` (N, 4), ``scores``, ``labels``) on the CPU in one copy for the whole batch
    (one host sync, not three per image): packed into one float64 tensor, which holds float32 boxes and scores
    and integer labels exactly, then split back into their own dtypes. Done on the CPU too (a cheap copy), so
    that the CPU tests run the path CUDA runs."""
    if not detections:
        return detections
    packed = torch.cat([torch.cat([d["boxes"].double(), d["scores"].double()[:, None], d["labels"].double()[:, None]],
                                  1) for d in detections]).cpu()
    return [{"boxes": p[:, :4].to(d["boxes"].dtype), "scores": p[:, 4].to(d["scores"].dtype),
             "labels": p[:, 5].to(d["labels"].dtype)}
            for p, d in zip(packed.split([len(d["scores"]) for d in detections]), detections)]


class DetectionEvaluator:
    """COCO's bbox mAP (pycocotools), or VOC's mAP at IoU 0.5 for a shard set the VOC converter wrote
    (``index.json`` ``"metric": "voc"``, ``"voc_ap"``: the AP method). Its detections are a host list, gathered
    over the ranks as Python objects."""
    metric = "mAP"
    device_keys = ()  # ``image_id`` and ``valid`` stay on the CPU

    def __init__(self, shard_set: ShardSet, ground_truth: Optional[dict] = None):
        self.shard_set, self.ground_truth = shard_set, ground_truth
        self.category_ids = [c["id"] for c in shard_set.index["classes"]]
        self.detections: list[dict] = []

    def update(self, predictions: list[dict], batch: dict) -> None:
        """Detections of the valid samples into the host list (``image_id`` and ``valid`` read on the CPU)."""
        predictions = detections_to_cpu(predictions)
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
        truth = self.ground_truth if self.ground_truth is not None else coco_ground_truth(self.shard_set)
        if self.shard_set is not None and self.shard_set.index.get("metric") == "voc":
            return {**voc_map(truth, detections, self.shard_set.index["voc_ap"]), "detections": len(detections)}
        return {**coco_map(truth, detections), "detections": len(detections)}

"""Evaluation: COCO mAP against pycocotools run directly, segmentation metrics by hand, and a 2-rank
expert-parallel evaluation against a one-process one."""
import contextlib
import io
import json

import numpy as np
import pytest
import torch
from conftest import demo_overrides, run_ranks
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from workers.eval_ranks import EVAL_OVERRIDES, fixed_images, head_outputs, prepare

from mthl_ds.analysis.metrics import DetectionEvaluator, SegmentationEvaluator
from mthl_ds.build import build_model
from mthl_ds.config import load_recipe
from mthl_ds.data.pipelines import IGNORE_INDEX
from mthl_ds.data.reader import ShardSet
from mthl_ds.evaluate import evaluate
from mthl_ds.train import open_shards


def hand_made_detections(gt: dict, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    dets = []
    for ann in gt["annotations"]:
        x, y, w, h = ann["bbox"]
        jitter = rng.normal(0, 3, size=4)
        dets.append({"image_id": ann["image_id"], "category_id": ann["category_id"],
                     "score": float(rng.uniform(0.3, 1)),
                     "bbox": [x + jitter[0], y + jitter[1], max(1, w + jitter[2]), max(1, h + jitter[3])]})
        if rng.random() < 0.3:  # a false positive of another category
            other = [c["id"] for c in gt["categories"] if c["id"] != ann["category_id"]][0]
            dets.append({"image_id": ann["image_id"], "category_id": other, "score": float(rng.uniform(0, 0.6)),
                         "bbox": [x, y, w, h]})
    return dets


def test_coco_map_equals_pycocotools(shards, tmp_path):
    gt_file = shards.parent / "raw" / "coco" / "annotations" / "instances_val2017.json"
    gt = json.loads(gt_file.read_text())
    dets = hand_made_detections(gt)
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(gt_file))
        direct = COCOeval(coco, coco.loadRes(str(tmp_path / "dets.json")), "bbox")
        direct.evaluate()
        direct.accumulate()
        direct.summarize()
    # our evaluator, fed xyxy boxes with contiguous labels as the detection head predicts them
    val = ShardSet.open(shards / "coco" / "val")
    evaluator = DetectionEvaluator(val)
    label_of = {c["id"]: i for i, c in enumerate(val.index["classes"])}
    for image in gt["images"]:
        mine = [d for d in dets if d["image_id"] == image["id"]]
        boxes = torch.tensor([d["bbox"] for d in mine], dtype=torch.float64).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        prediction = {"boxes": boxes, "scores": torch.tensor([d["score"] for d in mine]),
                      "labels": torch.tensor([label_of[d["category_id"]] for d in mine], dtype=torch.long)}
        evaluator.update([prediction], {"image_id": torch.tensor([image["id"]]), "valid": torch.tensor([True])})
    ours = evaluator.result(lambda t: t, lambda x: [x])
    assert 20 < ours["mAP"] < 100
    for key, index in (("mAP", 0), ("AP50", 1), ("AP75", 2)):
        assert ours[key] == pytest.approx(100 * direct.stats[index], abs=0.01), key


def test_segmentation_metrics_by_hand():
    evaluator = SegmentationEvaluator(3)
    target = torch.tensor([[[0, 0, 1, 1], [2, 2, 255, 1]]])
    prediction = torch.tensor([[[0, 1, 1, 1], [2, 0, 0, 1]]])
    evaluator.update(prediction, {"mask": target, "valid": torch.tensor([True])})
    evaluator.update(prediction, {"mask": target, "valid": torch.tensor([False])})  # padding never counts
    m = evaluator.result(lambda t: t, lambda x: [x])
    iou = [1 / 3, 3 / 4, 1 / 2]  # class 0: 1 hit / (2 gt + 2 pred - 1); class 1: 3 / (3 + 4 - 3); class 2: 1 / 2
    acc = [1 / 2, 3 / 3, 1 / 2]
    assert m["mIoU"] == pytest.approx(100 * np.mean(iou)) and m["mAcc"] == pytest.approx(100 * np.mean(acc))
    assert m["aAcc"] == pytest.approx(100 * 5 / 7) and m["pixels"] == 7


def bincount_confusion(targets, predictions, valid, num_classes: int) -> torch.Tensor:
    """The confusion matrix as evaluation built it before it moved to the device: per valid image, a bincount of
    the kept pixels (boolean-mask indexing), reshaped."""
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.float64)
    for target, pred, ok in zip(targets, predictions, valid.tolist()):
        if ok:
            keep = target != IGNORE_INDEX
            confusion += torch.bincount(target[keep] * num_classes + pred[keep], minlength=num_classes ** 2).reshape(
                num_classes, num_classes).double()
    return confusion


def test_confusion_by_index_add_equals_bincount_with_ignored_pixels_and_padding():
    """The flat index_add confusion (static shapes, for CUDA) equals the bincount one exactly, on random masks with
    ~20% ignored pixels and a padding sample, at the canvas scale (a batch tensor) and at original sizes (a list of
    masks of different sizes); the metrics computed from it are then the same."""
    gen = torch.Generator().manual_seed(0)
    num_classes = 7
    for step in range(3):
        targets = torch.randint(0, num_classes, (4, 23, 31), generator=gen)
        targets[torch.rand(targets.shape, generator=gen) < 0.2] = IGNORE_INDEX
        predictions = torch.randint(0, num_classes, (4, 23, 31), generator=gen)
        valid = torch.tensor([True, False, True, True])
        canvas = SegmentationEvaluator(num_classes)
        canvas.update(predictions, {"mask": targets, "valid": valid})
        sizes = [(23, 31), (5, 9), (17, 2), (1, 1)]
        originals = [t[:h, :w] for t, (h, w) in zip(targets, sizes)]
        cropped = [p[:h, :w] for p, (h, w) in zip(predictions, sizes)]
        original = SegmentationEvaluator(num_classes)
        original.update(cropped, {"mask_original": originals, "valid": valid})
        assert torch.equal(canvas.confusion, bincount_confusion(targets, predictions, valid, num_classes))
        assert torch.equal(original.confusion, bincount_confusion(originals, cropped, valid, num_classes))
        assert canvas.confusion.sum() > 0 and canvas.counts.sum() == targets.numel()  # the rest: the unread cell
        result = canvas.result(lambda t: t, lambda x: [x])
        assert result == SegmentationEvaluator.metrics(bincount_confusion(targets, predictions, valid, num_classes))


def test_two_rank_evaluation_equals_one_rank_at_any_eval_batch(shards, tmp_path):
    """Eval never drops a route, so 2 ranks with ep_size 2 at the recipe's eval batches and at batch 1 give the
    metrics of one process, and a fixed image gives the outputs it gives alone, whatever else shares its batch on
    either rank (tolerance 1e-5 of the largest output: float rounding differs with the batch's shape)."""
    run_ranks("eval_ranks.py", 2, [str(shards), str(tmp_path / "ranks.json")])
    distributed = json.loads((tmp_path / "ranks.json").read_text())
    recipe = load_recipe("demo", demo_overrides(shards) + EVAL_OVERRIDES + ["train.ep_size=1"])
    sets = open_shards(recipe, 1)
    model = prepare(build_model(recipe))
    single = evaluate(model, model, recipe.datasets, {n: v for n, (_, v) in sets.items()})
    assert single["coco"]["all"]["detections"] > 0
    for run in ("recipe_batch", "batch_1"):
        for name in single:
            for key, value in single[name]["all"].items():
                # AP sorts 6000 scores: rounding that differs with the batch's shape could reorder a near-tie
                # (prepare spreads the scores; measured: equal); counts are exact
                tolerance = 1e-3 if key.startswith("AP") or key == "mAP" else 1e-6
                assert distributed[run][name]["all"][key] == pytest.approx(value, abs=tolerance), (run, name, key)
    assert single["imagenet"]["all"]["samples"] == len(sets["imagenet"][1])
    with torch.no_grad():
        for rank in (0, 1):
            got = torch.load(tmp_path / f"outputs_rank{rank}.pt")
            for name, d in recipe.datasets.items():
                model.set_dataset(name)
                alone = torch.cat([head_outputs(model(image[None])) for image in fixed_images(name, d.size[0])])
                torch.testing.assert_close(got[name], alone, rtol=0, atol=1e-5 * float(alone.abs().max()),
                                           msg=f"{name} on rank {rank}")

"""Evaluation and prediction on CUDA against the CPU (``pytest -m cuda``; collected and skipped where there is no
CUDA).

One untrained demo model, its detector prepared as the evaluation tests prepare it (every box kept, class weights
spread: ``workers.eval_ranks.prepare``), copied to both devices. Both run float32 with TF32 off, so the devices
differ only in the order of float32 sums (about 1e-6 relative). Tolerances, each an order of magnitude or more
above that:

* raw outputs of every head: within 1e-4 of the largest output (the batch-independence test holds 1e-5 on one
  CPU; CUDA's kernels sum in other orders than the CPU's); top-1 the same wherever the CPU's two best logits are
  further apart than that;
* predict: top-5 probabilities within 1e-5; segmentation masks equal on at least 99.9% of the pixels (a pixel
  whose two best classes tie within rounding may flip); detection: the sorted scores within 1e-5, and at least
  90% of the CPU's detections have a CUDA twin (same class, score within 1e-5, box within 0.02 px: predict
  rounds boxes to 0.01 px). An untrained detector's scores sit within 1e-4 of each other, so near-ties can swap
  at the top-100 cut or in NMS;
* evaluate: sample and pixel counts exact; top-1 / top-5 within one image; mIoU, mAcc, aAcc within 0.05 points;
  mAP, AP50, AP75 within 0.1 points (the evaluator rounds scores to 1e-5, where near-ties can fall either way);
  the number of detections within 1%. ``reduce_sum`` is handed tensors on the model's device (NCCL's rule);
* bf16 autocast on CUDA against fp32 there: top-5 probabilities within 0.01, masks equal on 98% of the pixels,
  detection sorted scores within 1e-3 (bf16 keeps 8 significant bits; on the CPU the same comparison measured
  7e-4, 100% and, for the detector, scores finer than bf16 resolves: tests/test_predict.py).

``DEVICE`` is "cuda"; set it to "cpu" and drop ``pytestmark`` by hand to run these code paths on a machine without
a GPU (CPU against CPU).
"""
import copy

import numpy as np
import pytest
import torch
from workers.eval_ranks import prepare

from mthl_ds.build import build_model
from mthl_ds.config import load_recipe
from mthl_ds.data.reader import ShardSet
from mthl_ds.evaluate import evaluate
from mthl_ds.predict import Predictor
from mthl_ds.studies.bench.inference import flat_outputs

DEVICE = "cuda"
pytestmark = pytest.mark.cuda
SIZES = {"imagenet": 64, "coco": 128, "ade20k": 64}


@pytest.fixture(scope="module")
def models():
    """(the model on the CPU, its copy on DEVICE), in eval mode, with TF32 off while the module's tests run."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    cpu = prepare(build_model(load_recipe("demo")))
    yield cpu, copy.deepcopy(cpu).to(DEVICE)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def predictors(models, precision=None) -> tuple[Predictor, Predictor]:
    recipe = load_recipe("demo")
    datasets = {n: {"task": d.task, "num_classes": d.num_classes, "size": list(d.size), "classes": None}
                for n, d in recipe.datasets.items()}
    return (Predictor(models[0], datasets, device="cpu"),
            Predictor(models[1], datasets, device=DEVICE, precision=precision))


def images() -> list[np.ndarray]:
    """Three images of different sizes (two batches at batch size 2)."""
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8) for h, w in ((128, 96), (120, 160), (70, 70))]


def twins(a: dict, b: dict) -> int:
    """How many of the detections ``a`` have a twin in ``b``: the same class, the score within 1e-5 and the box
    within 0.02 px."""
    boxes, scores, labels = (np.asarray(b[k], dtype=np.float64) for k in ("boxes", "scores", "labels"))
    found = 0
    for box, score, label in zip(a["boxes"], a["scores"], a["labels"]):
        near = (labels == label) & (np.abs(scores - score) <= 1e-5)
        found += bool(near.any() and (np.abs(boxes[near] - box).max(1) <= 0.02).any())
    return found


@torch.no_grad()
def test_every_heads_outputs_on_cuda_equal_the_cpus(models):
    cpu, gpu = models
    for name, size in SIZES.items():
        x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(len(name)))
        cpu.set_dataset(name)
        gpu.set_dataset(name)
        want = flat_outputs(cpu(x))
        got = flat_outputs(gpu(x.to(DEVICE))).cpu()
        tolerance = 1e-4 * float(want.abs().max())
        torch.testing.assert_close(got, want, rtol=0, atol=tolerance, msg=name)
        if name == "imagenet":
            best = want.topk(2, dim=1).values
            clear = best[:, 0] - best[:, 1] > 2 * tolerance
            assert torch.equal(got.argmax(1)[clear], want.argmax(1)[clear])


def test_predict_on_cuda_matches_the_cpu(models):
    on_cpu, on_gpu = predictors(models)
    assert on_gpu.device.type == torch.device(DEVICE).type
    cpu, gpu = (p.predict(images(), "imagenet", batch_size=2) for p in (on_cpu, on_gpu))
    for a, b in zip(cpu, gpu):
        assert [c["score"] for c in b["top5"]] == pytest.approx([c["score"] for c in a["top5"]], abs=1e-5)
        scores = [c["score"] for c in a["top5"]]
        if scores[0] - scores[1] > 2e-5:
            assert a["top5"][0]["label"] == b["top5"][0]["label"]
    cpu, gpu = (p.predict(images(), "ade20k", batch_size=2) for p in (on_cpu, on_gpu))
    for a, b in zip(cpu, gpu):
        assert a["mask"].shape == b["mask"].shape and (a["mask"] == b["mask"]).mean() >= 0.999
    cpu, gpu = (p.predict(images(), "coco", batch_size=2) for p in (on_cpu, on_gpu))
    for a, b in zip(cpu, gpu):
        assert len(a["scores"]) > 0
        assert sorted(b["scores"]) == pytest.approx(sorted(a["scores"]), abs=1e-5)
        assert twins(a, b) >= 0.9 * len(a["scores"]), (twins(a, b), len(a["scores"]))


def test_evaluate_on_cuda_matches_the_cpu(models, shards):
    cpu, gpu = models
    datasets = load_recipe("demo").datasets
    val = {n: ShardSet.open(shards / n / "val") for n in SIZES}
    handed = []

    def reduce_sum(tensor):
        handed.append(tensor.device.type)
        return tensor

    want = evaluate(cpu, cpu, datasets, val)
    got = evaluate(gpu, gpu, datasets, val, reduce_sum=reduce_sum)
    assert handed and set(handed) == {torch.device(DEVICE).type}
    a, b = want["imagenet"]["all"], got["imagenet"]["all"]
    assert b["samples"] == a["samples"] > 0
    for key in ("top1", "top5"):
        assert b[key] == pytest.approx(a[key], abs=100 / a["samples"] + 1e-9), key
    a, b = want["ade20k"]["all"], got["ade20k"]["all"]
    assert b["pixels"] == a["pixels"] > 0
    for key in ("mIoU", "mAcc", "aAcc"):
        assert b[key] == pytest.approx(a[key], abs=0.05), key
    a, b = want["coco"]["all"], got["coco"]["all"]
    assert a["detections"] > 0 and b["detections"] == pytest.approx(a["detections"], rel=0.01)
    for key in ("mAP", "AP50", "AP75"):
        assert b[key] == pytest.approx(a[key], abs=0.1), key


def test_predict_in_bf16_on_cuda_is_close_to_fp32(models):
    fp32 = predictors(models)[1]
    bf16 = predictors(models, "bf16")[1]
    for name in ("imagenet", "ade20k", "coco"):
        for a, b in zip(fp32.predict(images(), name, batch_size=2), bf16.predict(images(), name, batch_size=2)):
            if name == "imagenet":
                assert [c["score"] for c in b["top5"]] == pytest.approx([c["score"] for c in a["top5"]], abs=0.01)
            elif name == "ade20k":
                assert (a["mask"] == b["mask"]).mean() >= 0.98
            else:
                assert sorted(b["scores"]) == pytest.approx(sorted(a["scores"]), abs=1e-3)


def test_banded_segmentation_resize_gives_the_whole_image_labels_on_the_device():
    """The banded resize and arg-max on CUDA: the labels of CUDA's own whole-image bilinear resize, and of the
    CPU's (float32 on both; a label could differ only where two classes tie within rounding)."""
    from mthl_ds.models.heads import resized_argmax
    logits = torch.randn(150, 128, 96, generator=torch.Generator().manual_seed(0))
    whole = torch.nn.functional.interpolate(logits[None].to(DEVICE), size=(1000, 750), mode="bilinear",
                                            align_corners=False)[0].argmax(0)
    banded = resized_argmax(logits.to(DEVICE), (1000, 750), max_elements=150 * 750 * 7)
    assert banded.device.type == DEVICE and torch.equal(banded, whole)
    assert (banded.cpu() == resized_argmax(logits, (1000, 750))).float().mean() > 0.9999

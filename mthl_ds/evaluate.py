"""Evaluation of a model on val shard sets: the loop the trainer runs mid-run and at the end, and
``mthl-ds evaluate`` on an export, a run folder or a checkpoint. Each rank evaluates its share of the val
shards; the metrics (``mthl_ds.analysis.metrics``) sum and gather over the ranks.

Protocols. Classification: timm's eval transform (resize, centre crop 0.875). Detection: COCO bbox AP
(pycocotools) on boxes mapped back to the original image, against the ground truth rebuilt from the shards (the
default: what the trainer scores) or, given, the original ``instances_*.json`` (images and boxes dropped at
conversion then count as misses). Segmentation: the image fitted into the crop canvas; by default scored at the
canvas scale against the mask resized with it (the trainer's protocol), or at the original resolution as mmseg
scores (``original``: the logits of the image's part of the canvas resized back to the image, bilinear, then
argmax, against the original mask). mmseg's ADE20K test resizes the short side to 512 instead of fitting the
long side into 512 x 512; the model input differs there, not the scoring.

Devices. The images, the targets the metrics read (labels, masks) and the metric accumulators live on the
model's device. Host metadata (``scale``, ``orig_size``, ``image_id``, and ``valid`` for detection) stays on the
CPU, where the heads' postprocessing and the detection list read it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from mthl_ds.analysis.metrics import Gather, ReduceSum
from mthl_ds.config import DatasetConfig, Recipe
from mthl_ds.data.pipelines import PipelineConfig, eval_loader, make_decoder
from mthl_ds.data.reader import ShardSet
from mthl_ds.data.shards import ShardError
from mthl_ds.errors import InputError
from mthl_ds.runtime.device import DeviceLike, resolve, to_device
from mthl_ds.tasks import task_spec


def coco_annotations(path: Path) -> dict:
    """An original COCO ``instances_*.json`` as ground truth."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ShardError(f"{path}: cannot read COCO annotations ({e})") from None
    missing = [k for k in ("images", "annotations", "categories") if k not in data]
    if missing:
        raise ShardError(f"{path}: missing key(s) {missing}; not a COCO instances file")
    return data


def dataset_pipeline(d: DatasetConfig, original: bool = False) -> PipelineConfig:
    return PipelineConfig(d.task, tuple(d.size), crop_scale=tuple(d.crop_scale), original=original)


def pipeline_config(recipe: Recipe, name: str) -> PipelineConfig:
    return dataset_pipeline(recipe.datasets[name])


def single(values):
    return values


def model_device(model) -> torch.device:
    """Where ``model``'s parameters are (the device it computes on)."""
    return next(model.parameters()).device


@torch.no_grad()
def evaluate(forward, model, datasets: dict[str, DatasetConfig], val_sets: dict[str, ShardSet], rank: int = 0,
             world: int = 1,
             workers: int = 0, reduce_sum: ReduceSum = single, gather: Gather = lambda obj: [obj],
             ground_truth: Optional[dict[str, dict]] = None, original: bool = False,
             device: DeviceLike = None) -> dict:
    """Every dataset's val metrics (``val_sets`` names the datasets; ``datasets`` gives their task, classes and
    input geometry, e.g. a recipe's). ``forward`` is the engine (or the plain model
    in one process); each rank evaluates its share, counts are summed (``reduce_sum``) and detections gathered
    (``gather``), so any world size gives the same result. ``ground_truth``: COCO ground truth per detection
    dataset; ``original``: segmentation at the original resolution (module docstring). ``device``: where the
    images, targets and counts go (default: the model's parameters' device); ``reduce_sum`` is handed tensors on
    it (NCCL refuses CPU tensors)."""
    device = model_device(model) if device is None else torch.device(device)
    results = {}
    for name, val in val_sets.items():
        d = datasets[name]
        loader = eval_loader(val, make_decoder(dataset_pipeline(d, original), train=False),
                             d.eval_batch_size or d.batch_size, rank, world, workers,
                             pin_memory=device.type == "cuda")  # so that the copies below are asynchronous
        spec = task_spec(d.task)
        evaluator = spec.make_evaluator(d.num_classes, val, (ground_truth or {}).get(name), device)
        model.set_dataset(name)
        head = model.heads[name]
        for batch in loader:
            moved = {k: batch[k] for k in ("image", *evaluator.device_keys) if k in batch}
            batch = {**batch, **to_device(moved, device, model.dtype)}  # the rest stays on the host
            evaluator.update(head.predict(forward(batch["image"]), batch), batch)
        metrics = evaluator.result(reduce_sum, gather)
        results[name] = {"task": d.task, "metric": evaluator.metric, "value": metrics[evaluator.metric],
                         "chance": spec.chance_level(evaluator, d.num_classes, reduce_sum), "all": metrics}
    return results


def run_evaluate(model_path: Path, data: list[tuple[str, Path]], split: str = "val",
                 annotations: Optional[dict[str, Path]] = None, original: bool = False, batch_size: int = 0,
                 out: Optional[Path] = None, device: DeviceLike = None) -> dict:
    """``mthl-ds evaluate``: every metric of the named datasets for an export, a run folder or a checkpoint, in one
    process; JSON and a markdown report under ``out``. Input sizes and classes come from the model's metadata.
    ``device``: ``cpu``, ``cuda`` or ``cuda:N`` (default: CUDA where there is one, else the CPU), checked before
    any work; the model is loaded onto the CPU, then moved there."""
    from mthl_ds.artifacts.export import load_model
    device = resolve(device)
    model, label, inputs = load_model(Path(model_path))
    model.eval().to(device)
    configs, val_sets = {}, {}
    for name, folder in data:  # every dataset checked before any evaluation
        if name not in model.heads:
            raise InputError(f"--data {name}={folder}: the model has no dataset {name!r}; it has {sorted(model.heads)}")
        shard_set = ShardSet.open(folder if (Path(folder) / "index.json").is_file() else Path(folder) / split)
        info = inputs[name]
        if shard_set.task != info["task"] or shard_set.index["num_classes"] != info["num_classes"]:
            raise InputError(f"--data {name}={folder}: {shard_set.root} holds {shard_set.task} shards with "
                             f"{shard_set.index['num_classes']} classes; the model's {name!r} is {info['task']} with "
                             f"{info['num_classes']}")
        configs[name] = DatasetConfig(info["task"], num_classes=info["num_classes"], size=tuple(info["size"]),
                                      batch_size=batch_size or info["eval_batch_size"])
        val_sets[name] = shard_set
    truth = {}
    for name, path in (annotations or {}).items():
        if configs.get(name) is None or configs[name].task != "detection":
            raise InputError(f"--annotations {name}={path}: {name!r} is not a detection dataset of --data")
        truth[name] = coco_annotations(path)
    results = evaluate(model, model, configs, val_sets, ground_truth=truth, original=original, device=device)
    protocol = {
    n: task_spec(
        c.task).protocol(
            val_sets[n],
            (annotations or {}).get(n),
            original) for n,
             c in configs.items()}
    summary = {"model": str(model_path), "label": label, "split": split, "device": str(device), "protocol": protocol,
               "results": results}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval_metrics.json").write_text(json.dumps(summary, indent=1) + "\n")
        lines = [f"# Evaluation of {label}", "", "| dataset | task | metric | value | protocol | all |",
                 "|---|---|---|---|---|---|"]
        for name, r in results.items():
            extra = ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in r["all"].items())
            lines.append(f"| {name} | {r['task']} | {r['metric']} | {r['value']:.2f} | {protocol[name]} | {extra} |")
        (out / "report.md").write_text("\n".join(lines) + "\n")
    return summary

"""Prediction on images with an exported model (or a run folder, or a checkpoint): no launcher, no process group.

    import mthl_ds
    model = mthl_ds.load("runs/demo/model.safetensors")
    results = model.predict(["a.jpg", "b.png"], dataset="coco")   # paths, PIL images or HxWx3 uint8 arrays

Each image is preprocessed as evaluation does (``mthl_ds.data.pipelines.eval_preprocess``) and, since no route is
dropped in eval, its result does not depend on the other images of its batch. Results per image:
classification ``{"top5": [{"label", "name", "score"}]}``; detection ``{"boxes": [[x, y, w, h]], "scores",
"labels", "category_ids", "names"}`` in the original image's pixels; segmentation ``{"mask": HxW uint8 class
indices}`` at the original size.

Devices and precision. The model is loaded onto the CPU, then moved to the device named (``device``: ``cpu``,
``cuda``, ``cuda:N``; default CUDA where there is one, else the CPU). Images are preprocessed on the CPU, batched,
and each batch is copied to the device (``non_blocking``, from pinned memory on CUDA); the results come back to
the CPU once per batch. ``precision`` ``bf16`` or ``fp16`` runs the model under ``torch.autocast`` (None or
``fp32``: plain float32); postprocessing stays in float32. fp16 on the CPU is refused (:func:`autocast_dtype`).
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageDraw

from mthl_ds.config import DatasetConfig
from mthl_ds.data.images import read_rgb, to_rgb
from mthl_ds.data.pipelines import eval_preprocess
from mthl_ds.errors import InputError
from mthl_ds.evaluate import dataset_pipeline
from mthl_ds.models.mthl import MTHLModel
from mthl_ds.runtime.device import DeviceLike, resolve, to_device
from mthl_ds.tasks import task_spec

ImageInput = Union[str, Path, Image.Image, np.ndarray]
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(precision: Optional[str], device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of ``precision`` on ``device`` (None: no autocast, for None and ``fp32``), checked before
    any work. fp16 on the CPU is refused: CPUs have no fast float16 arithmetic (autocast to float16 would run
    slower than fp32, where it runs at all); bf16 is allowed there."""
    if precision is not None and precision not in PRECISIONS:
        raise InputError(f"--precision {precision!r}: use one of {sorted(PRECISIONS)}")
    dtype = PRECISIONS.get(precision)
    if dtype is torch.float16 and device.type == "cpu":
        raise InputError("--precision fp16 on the CPU is refused: CPUs have no fast float16 arithmetic; "
                         "use fp32 or bf16 on the CPU, fp16 on CUDA")
    return dtype


def open_image(item: ImageInput) -> Image.Image:
    """An upright 8-bit RGB image from a path (read by :mod:`mthl_ds.data.images`: EXIF orientation applied,
    every pixel mode converted by its meaning), a PIL image (converted the same way) or an HxWx3 uint8 array; an
    unusable input raises :class:`InputError` naming it and what is wrong."""
    if isinstance(item, Image.Image):
        return to_rgb(item)
    if isinstance(item, np.ndarray):
        if item.ndim != 3 or item.shape[2] != 3 or item.dtype != np.uint8:
            raise InputError(f"an image array must be HxWx3 uint8, got {item.shape} {item.dtype}")
        return Image.fromarray(item)
    if not isinstance(item, (str, Path)):
        raise InputError(f"an image must be a path, a PIL image or an HxWx3 uint8 array, got {type(item).__name__}")
    return read_rgb(item)


def error_record(item: ImageInput, error: Exception) -> dict:
    """What a result list holds for an input that could not be used (``errors="skip"``)."""
    name = str(item) if isinstance(item, (str, Path)) else type(item).__name__
    return {"file": name, "error": str(error)}


def open_all(images: Sequence[ImageInput], errors: str) -> list[Union[Image.Image, dict]]:
    """Every input opened before any model work: an image, or with ``errors="skip"`` an error record."""
    if errors not in ("raise", "skip"):
        raise InputError(f"errors={errors!r}: use 'raise' (the first unusable image raises) or 'skip'")
    opened = []
    for item in images:
        try:
            opened.append(open_image(item))
        except InputError as e:
            if errors == "raise":
                raise
            opened.append(error_record(item, e))
    return opened


class Predictor:
    """A single-device model in eval mode on ``device`` (default: where the model is), what each of its datasets
    needs (task, size, class names), and the precision it predicts in (``precision``: see the module docstring)."""

    def __init__(self, model: MTHLModel, datasets: dict[str, dict], label: str = "", device: DeviceLike = None,
                 precision: Optional[str] = None):
        self.device = next(model.parameters()).device if device is None else resolve(device)
        self.autocast = autocast_dtype(precision, self.device)
        self.model = model.eval().to(self.device)
        self.datasets = {n: d for n, d in datasets.items() if n in model.heads}
        self.label = label

    @classmethod
    def load(cls, path: Union[str, Path], device: DeviceLike = None, precision: Optional[str] = None) -> "Predictor":
        """An export, a run folder or a checkpoint, loaded onto the CPU, then moved to ``device`` (``cpu``, ``cuda``,
        ``cuda:N``; default: CUDA where there is one, else the CPU). The device and the precision are checked
        before the model is read."""
        from mthl_ds.artifacts.export import load_model
        device = resolve(device)
        autocast_dtype(precision, device)
        model, label, datasets = load_model(Path(path))
        return cls(model, datasets, label, device, precision)

    def check_dataset(self, dataset: str) -> dict:
        if dataset not in self.datasets:
            raise InputError(f"unknown dataset {dataset!r}; this model predicts for {sorted(self.datasets)}")
        return self.datasets[dataset]

    @torch.no_grad()
    def predict(self, images: Sequence[ImageInput], dataset: str, batch_size: int = 8,
                precision: Optional[str] = None, errors: str = "raise") -> list[dict]:
        """Results per image (module docstring), ``batch_size`` images per forward. ``precision``: this call's,
        instead of the predictor's. ``errors``: ``"raise"`` raises :class:`InputError` on the first unusable
        input, before any model work; ``"skip"`` puts ``{"file", "error"}`` in its place and predicts the rest."""
        info = self.check_dataset(dataset)
        dtype = self.autocast if precision is None else autocast_dtype(precision, self.device)
        inputs = open_all(images, errors)
        opened = [i for i in inputs if isinstance(i, Image.Image)]
        cfg = dataset_pipeline(DatasetConfig(info["task"], num_classes=info["num_classes"], size=tuple(info["size"])))
        preprocess = eval_preprocess(cfg)
        spec = task_spec(info["task"])
        self.model.set_dataset(dataset)
        head = self.model.heads[dataset]
        results = []
        for start in range(0, len(opened), batch_size):
            chunk = opened[start:start + batch_size]
            tensors, scales = zip(*(preprocess(img) for img in chunk))
            stacked = torch.stack(tensors)
            if self.device.type == "cuda":
                stacked = stacked.pin_memory()  # so that the copy is asynchronous
            batch = {**to_device({"image": stacked}, self.device, self.model.dtype),
                     "scale": torch.tensor(scales), "orig_size": [(img.height, img.width) for img in chunk]}  # host
            with torch.autocast(self.device.type, dtype) if dtype is not None else contextlib.nullcontext():
                output = self.model(batch["image"])
            output = spec.output_to_cpu(head.predict(output, batch))  # float32, outside autocast
            results += [spec.prediction(out, info.get("classes")) for out in
                        (output if isinstance(output, list) else list(output))]
        found = iter(results)
        return [next(found) if isinstance(i, Image.Image) else i for i in inputs]


# ------------------------------------------------------------------------------------------------ the command

def palette(count: int) -> np.ndarray:
    return np.random.default_rng(0).integers(40, 256, size=(max(count, 1), 3)).astype(np.uint8)


def draw_boxes(img: Image.Image, result: dict, threshold: float) -> Image.Image:
    img = img.copy()
    draw = ImageDraw.Draw(img)
    for (x, y, w, h), score, name in zip(result["boxes"], result["scores"], result["names"]):
        if score >= threshold:
            draw.rectangle((x, y, x + w, y + h), outline=(255, 40, 40), width=2)
            draw.text((x + 2, y + 1), f"{name} {score:.2f}", fill=(255, 255, 0))
    return img


def overlay(img: Image.Image, mask: np.ndarray, num_classes: int) -> Image.Image:
    """The image half-blended with each pixel's class colour, in 8 bits (a float copy of a 24-megapixel photo
    would take GBs)."""
    return Image.blend(img, Image.fromarray(palette(num_classes)[mask]), 0.5)


def output_names(paths: Sequence[Path]) -> list[str]:
    """A unique output name per input: its path relative to the inputs' common folder, file extension kept
    (``dup/chelsea.png`` and ``chelsea.jpg`` stay apart); one file given twice gets one name."""
    resolved = [Path(p).resolve() for p in paths]
    root = Path(os.path.commonpath([p.parent for p in resolved])) if resolved else Path(".")
    return [p.relative_to(root).as_posix() for p in resolved]


def run_predict(model_path: Path, dataset: str, images: Sequence[Path], out: Path, batch_size: int = 8,
                draw_threshold: float = 0.3, device: DeviceLike = None, precision: Optional[str] = None) -> dict:
    """``mthl-ds predict``: JSON of every result, and for detection the boxes drawn, for segmentation each mask
    (PNG, original size, class indices) and an overlay, named after each input's path below the inputs' common
    folder (``NAME.mask.png``, ``NAME.overlay.jpg``, ``NAME.boxes.jpg``). An input that cannot be read gets an
    error record (file, reason) and the others still get results; the summary lists the failures. Returns a
    summary with images/s. ``device`` and ``precision``: as :meth:`Predictor.load`."""
    predictor = Predictor.load(model_path, device, precision)
    info = predictor.check_dataset(dataset)
    inputs = open_all(images, "skip")
    start = time.perf_counter()
    results = predictor.predict([i for i in inputs if isinstance(i, Image.Image)], dataset, batch_size)
    seconds = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    records, found = [], iter(results)
    for index, (path, name, img) in enumerate(zip(images, output_names(images), inputs), start=1):
        if not isinstance(img, Image.Image):
            records.append({"image_id": index, **img})
            continue
        result = next(found)
        target = out / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if info["task"] == "segmentation":
            mask = result.pop("mask")
            Image.fromarray(mask).save(f"{target}.mask.png")
            overlay(img, mask, info["num_classes"]).save(f"{target}.overlay.jpg")
            result = {"mask": f"{name}.mask.png", "overlay": f"{name}.overlay.jpg", "size": [img.width, img.height]}
        elif info["task"] == "detection":
            draw_boxes(img, result, draw_threshold).save(f"{target}.boxes.jpg")
            result = {**result, "drawing": f"{name}.boxes.jpg"}
        records.append({"image_id": index, "file": str(path), **result})
    (out / "predictions.json").write_text(json.dumps(records, indent=1) + "\n")
    if info["task"] == "detection":  # COCO results format, image ids as in predictions.json
        coco = [{"image_id": r["image_id"], "category_id": c, "bbox": b, "score": round(s, 5)}
                for r in records if "error" not in r
                for b, s, c in zip(r["boxes"], r["scores"], r["category_ids"])]
        (out / "detections.json").write_text(json.dumps(coco) + "\n")
    failed = [r for r in records if "error" in r]
    return {"images": len(results), "failed": failed, "seconds": seconds,
            "images_per_s": len(results) / max(seconds, 1e-9), "out": str(out), "device": str(predictor.device)}

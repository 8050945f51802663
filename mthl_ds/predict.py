"""Prediction on images with an exported model (or a run folder, or a checkpoint): no launcher, no process group.

    import mthl_ds
    model = mthl_ds.load("runs/demo/model.safetensors")
    results = model.predict(["a.jpg", "b.png"], dataset="coco")   # paths, PIL images or HxWx3 uint8 arrays

Each image is preprocessed as evaluation does (``mthl_ds.data.pipelines.eval_preprocess``) and, since no route is
dropped in eval, its result does not depend on the other images of its batch. Results per image:
classification ``{"top5": [{"label", "name", "score"}]}``; detection ``{"boxes": [[x, y, w, h]], "scores",
"labels", "category_ids", "names"}`` in the original image's pixels; segmentation ``{"mask": HxW uint8 class
indices}`` at the original size.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageDraw

from mthl_ds.config import DatasetConfig
from mthl_ds.data.pipelines import eval_preprocess
from mthl_ds.errors import InputError
from mthl_ds.evaluation import dataset_pipeline
from mthl_ds.models.mthl import MTHLModel

ImageInput = Union[str, Path, Image.Image, np.ndarray]


def open_image(item: ImageInput) -> Image.Image:
    """An RGB image from a path, a PIL image or an HxWx3 uint8 array; a file that is not an image is refused."""
    if isinstance(item, Image.Image):
        return item.convert("RGB")
    if isinstance(item, np.ndarray):
        if item.ndim != 3 or item.shape[2] != 3 or item.dtype != np.uint8:
            raise InputError(f"an image array must be HxWx3 uint8, got {item.shape} {item.dtype}")
        return Image.fromarray(item)
    path = Path(item)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except Exception as e:  # PIL raises several types for files that are not images
        raise InputError(f"{path}: not an image ({type(e).__name__}: {e})") from None


class Predictor:
    """A single-device model in eval mode and what each of its datasets needs (task, size, class names)."""

    def __init__(self, model: MTHLModel, datasets: dict[str, dict], label: str = ""):
        self.model = model.eval()
        self.datasets = {n: d for n, d in datasets.items() if n in model.heads}
        self.label = label

    @classmethod
    def load(cls, path: Union[str, Path]) -> "Predictor":
        from mthl_ds.export import load_model
        model, label, datasets = load_model(Path(path))
        return cls(model, datasets, label)

    def check_dataset(self, dataset: str) -> dict:
        if dataset not in self.datasets:
            raise InputError(f"unknown dataset {dataset!r}; this model predicts for {sorted(self.datasets)}")
        return self.datasets[dataset]

    def class_name(self, dataset: str, label: int) -> str:
        classes = self.datasets[dataset].get("classes")
        if not classes:
            return f"class_{label}"
        entry = classes[label]
        return entry["name"] if isinstance(entry, dict) else str(entry)

    @torch.no_grad()
    def predict(self, images: Sequence[ImageInput], dataset: str, batch_size: int = 8) -> list[dict]:
        info = self.check_dataset(dataset)
        opened = [open_image(i) for i in images]  # every input checked before any work
        cfg = dataset_pipeline(DatasetConfig(info["task"], num_classes=info["num_classes"], size=tuple(info["size"])))
        preprocess = eval_preprocess(cfg)
        self.model.set_dataset(dataset)
        head = self.model.heads[dataset]
        results = []
        for start in range(0, len(opened), batch_size):
            chunk = opened[start:start + batch_size]
            tensors, scales = zip(*(preprocess(img) for img in chunk))
            batch = {"image": torch.stack(tensors).to(self.model.dtype), "scale": torch.tensor(scales),
                     "orig_size": [(img.height, img.width) for img in chunk]}
            output = head.predict(self.model(batch["image"]), batch)
            results += [self.result(dataset, info["task"], out) for out in
                        (output if isinstance(output, list) else list(output))]
        return results

    def result(self, dataset: str, task: str, out) -> dict:
        if task == "classification":
            probs = out.float().softmax(-1)
            top = probs.topk(min(5, len(probs)))
            return {"top5": [{"label": int(i), "name": self.class_name(dataset, int(i)), "score": float(p)}
                             for p, i in zip(top.values, top.indices)]}
        if task == "detection":
            boxes = out["boxes"].clone()
            boxes[:, 2:] -= boxes[:, :2]
            labels = out["labels"].tolist()
            classes = self.datasets[dataset].get("classes") or []
            ids = [classes[label]["id"] if classes and isinstance(classes[label], dict) else label for label in labels]
            return {"boxes": [[round(v, 2) for v in b] for b in boxes.tolist()], "scores": out["scores"].tolist(),
                    "labels": labels, "category_ids": ids, "names": [self.class_name(dataset, label) for label in labels]}
        return {"mask": out.to(torch.uint8).numpy()}


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
    colours = palette(num_classes)[mask]
    return Image.fromarray((0.5 * np.asarray(img) + 0.5 * colours).astype(np.uint8))


def run_predict(model_path: Path, dataset: str, images: Sequence[Path], out: Path, batch_size: int = 8,
                draw_threshold: float = 0.3) -> dict:
    """``mthl-ds predict``: JSON of every result, and for detection the boxes drawn, for segmentation each mask
    (PNG, original size, class indices) and an overlay. Returns a summary with images/s."""
    predictor = Predictor.load(model_path)
    info = predictor.check_dataset(dataset)
    opened = [open_image(p) for p in images]
    start = time.perf_counter()
    results = predictor.predict(opened, dataset, batch_size)
    seconds = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for index, (path, img, result) in enumerate(zip(images, opened, results), start=1):
        stem = Path(path).stem
        if info["task"] == "segmentation":
            Image.fromarray(result.pop("mask")).save(out / f"{stem}_mask.png")
            overlay(img, np.asarray(Image.open(out / f"{stem}_mask.png")), info["num_classes"]).save(
                out / f"{stem}_overlay.jpg")
            result = {"mask": f"{stem}_mask.png", "overlay": f"{stem}_overlay.jpg"}
        elif info["task"] == "detection":
            draw_boxes(img, result, draw_threshold).save(out / f"{stem}_boxes.jpg")
        records.append({"image_id": index, "file": str(path), **result})
    (out / "predictions.json").write_text(json.dumps(records, indent=1) + "\n")
    if info["task"] == "detection":  # COCO results format, image ids as in predictions.json
        coco = [{"image_id": r["image_id"], "category_id": c, "bbox": b, "score": round(s, 5)}
                for r in records for b, s, c in zip(r["boxes"], r["scores"], r["category_ids"])]
        (out / "detections.json").write_text(json.dumps(coco) + "\n")
    return {"images": len(images), "seconds": seconds, "images_per_s": len(images) / max(seconds, 1e-9),
            "out": str(out)}

"""Task pipelines: raw shard samples to fixed-shape tensors, and per-dataset loaders that resume exactly.

Every dataset has one tensor shape for all its batches (crop size, detection canvas, segmentation crop),
so the ranks of an expert-parallel group always send the same number of tokens per MoE call.
"""
from __future__ import annotations

import collections
import io
import json
import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import create_transform
from torch.utils.data import DataLoader

from mthl_ds import geometry
from mthl_ds.data.images import rgb_from_bytes
from mthl_ds.data.reader import EvalStream, LoaderState, ShardSet, TrainStream, worker_init
from mthl_ds.data.shards import MaskLabels
from mthl_ds.geometry import IGNORE_INDEX, padded

MEAN = torch.tensor(geometry.MEAN).view(3, 1, 1)
STD = torch.tensor(geometry.STD).view(3, 1, 1)


@dataclass(frozen=True)
class PipelineConfig:
    """Input geometry of one dataset. ``size`` (height, width) is the crop (classification, segmentation) or,
    for detection, the bound an image is resized into (mmdet's ``img_scale``), padded up to a multiple of 32 for
    the canvas."""
    task: str
    size: tuple[int, int]
    scale_range: tuple[float, float] = (0.5, 2.0)  # segmentation random rescale
    crop_scale: tuple[float, float] = (0.08, 1.0)  # classification RandomResizedCrop area range
    original: bool = False  # segmentation eval: also the original mask, for scoring at the original resolution


def image_bytes(sample: dict, png_is_mask: bool = False) -> bytes:
    """A sample's image member: ``jpg``, or a PNG image, stored as ``img.png`` in segmentation (whose ``png`` is
    the mask: ``png_is_mask``) and as ``png`` in classification and detection."""
    for ext in ("jpg", "jpeg", "img.png"):
        if ext in sample:
            return sample[ext]
    if "png" in sample and not png_is_mask:
        return sample["png"]
    raise KeyError(f"sample {sample.get('__key__')} has no image member (has {sorted(sample)})")


def open_rgb(sample: dict, png_is_mask: bool = False) -> Image.Image:
    """A sample's image as the converters saw it: upright, 8-bit RGB (:mod:`mthl_ds.data.images`)."""
    return rgb_from_bytes(image_bytes(sample, png_is_mask), sample.get("__key__", "image"))


def to_normalized(img: Image.Image) -> torch.Tensor:
    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255
    return (arr - MEAN) / STD


def random_resized_crop(rng: np.random.Generator, width: int, height: int, scale: tuple[float, float],
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box, drawn from ``rng`` instead of the global RNGs: (left, top, w, h)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    in_ratio = width / height  # fallback: the central crop of the allowed aspect range
    w, h = (width, round(width / ratio[0])) if in_ratio < ratio[0] else (
        (round(height * ratio[1]), height) if in_ratio > ratio[1] else (width, height))
    return (width - w) // 2, (height - h) // 2, w, h


def eval_preprocess(cfg: PipelineConfig) -> Callable[[Image.Image], tuple[torch.Tensor, float]]:
    """How evaluation and prediction turn an RGB image into the model's input: (tensor, the scale from the
    image to it). Classification: timm's eval transform (resize, centre crop 0.875); detection: fit into the size
    and pad to the canvas; segmentation: fit and pad into the crop."""
    if cfg.task == "classification":
        transform = create_transform(cfg.size, is_training=False, interpolation="bicubic", crop_pct=0.875)
        return lambda img: (transform(img), 1.0)
    canvas = padded(cfg.size) if cfg.task == "detection" else tuple(cfg.size)
    return lambda img: fit_and_pad(img, cfg.size, Image.BILINEAR, canvas)


def classification_decoder(cfg: PipelineConfig, train: bool) -> Callable:
    """Train: RandomResizedCrop (bicubic) + flip + normalise, drawn from the per-sample generator so the
    result depends on (seed, reader, ordinal) only. Eval: timm's transform (resize, center crop 0.875)."""
    preprocess = eval_preprocess(cfg)
    out_h, out_w = cfg.size

    def decode(sample: dict, rng: Optional[np.random.Generator]) -> dict:
        img = open_rgb(sample)
        if not train:
            return {"image": preprocess(img)[0], "label": int(sample["cls"])}
        left, top, w, h = random_resized_crop(rng, img.width, img.height, cfg.crop_scale)
        img = img.resize((out_w, out_h), Image.BICUBIC, box=(left, top, left + w, top + h))
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return {"image": to_normalized(img), "label": int(sample["cls"])}
    return decode


def fit_and_pad(img: Image.Image, size: tuple[int, int], resample,
                canvas: Optional[tuple[int, int]] = None) -> tuple[torch.Tensor, float]:
    """Resize keeping aspect to fit ``size`` (h, w), normalise, pad bottom/right with zeros (the mean colour) to
    ``canvas`` (default: ``size``)."""
    h, w = size
    canvas_h, canvas_w = canvas or size
    scale = min(h / img.height, w / img.width)
    new = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    tensor = to_normalized(img.resize(new, resample))
    return F.pad(tensor, (0, canvas_w - new[0], 0, canvas_h - new[1])), scale


def detection_decoder(cfg: PipelineConfig, train: bool) -> Callable:
    """Training skips images without annotations (mmdet's ``filter_empty_gt``; crowd-only images stay, with no
    box to learn). Flip with boxes (train), resize keeping aspect to fit ``size`` (mmdet's
    ``Resize(keep_ratio=True)``), pad to the canvas, ``size`` padded up to a multiple of 32 (mmdet's
    ``Pad(size_divisor=32)``: 800 x 1333 -> 800 x 1344). Boxes become xyxy in canvas pixels; crowd boxes are
    dropped for training and kept (flagged) for evaluation.

    Portrait images: mmdet fits the long side to 1333 and the short side to 800 whatever the orientation, and
    groups each batch by orientation, so a 480 x 640 (w x h) image becomes 800 x 1067. Here every image of a
    dataset shares one landscape canvas, so a portrait image is fitted to the canvas height instead (600 x 800,
    0.75 of mmdet's scale). Deliberate: one shape per dataset keeps the expert-parallel ranks' token counts equal
    without grouping batches, and the loaders then resume exactly by sample ordinal (a grouping buffer would hold
    samples across a checkpoint)."""
    preprocess = eval_preprocess(cfg)

    def decode(sample: dict, rng: Optional[np.random.Generator]) -> Optional[dict]:
        meta = json.loads(sample["json"])
        if train and not meta["boxes"]:
            return None  # mmdet's filter_empty_gt: an image without annotations is not trained on
        img = open_rgb(sample)
        boxes = torch.tensor(meta["boxes"], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        labels = torch.tensor(meta["labels"], dtype=torch.long)
        crowd = torch.tensor(meta["iscrowd"], dtype=torch.bool)
        if train:
            boxes, labels = boxes[~crowd], labels[~crowd]
            if rng.random() < 0.5:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
                boxes = torch.stack([img.width - boxes[:, 2], boxes[:, 1], img.width - boxes[:, 0], boxes[:, 3]], 1)
        image, scale = preprocess(img)  # the same fit and pad in training
        return {"image": image, "boxes": boxes * scale, "labels": labels, "image_id": meta["image_id"],
                "scale": scale, "orig_size": (meta["height"], meta["width"])}
    return decode


def mask_classes(mask: np.ndarray, labels: MaskLabels) -> torch.Tensor:
    """Stored mask values -> class ids, IGNORE_INDEX where no class (the shard set's :class:`MaskLabels`)."""
    out = mask.astype(np.int64)
    ignored = mask == labels.ignore_index
    if labels.reduce_zero_label:  # ADE20K: 0 is unlabelled, class k is stored as k + 1
        ignored |= mask == 0
        out -= 1
    out[ignored] = IGNORE_INDEX
    return torch.from_numpy(out)


def segmentation_decoder(cfg: PipelineConfig, train: bool) -> Callable:
    """Train: random rescale (short side = crop short side x U(scale_range)), random crop (padding with the
    ignore index), flip. Eval: resize keeping aspect into the crop canvas, pad. Metrics use the resized mask."""
    crop_h, crop_w = cfg.size
    preprocess = eval_preprocess(cfg)

    def decode(sample: dict, rng: Optional[np.random.Generator]) -> dict:
        img = open_rgb(sample, png_is_mask=True)
        mask_img = Image.open(io.BytesIO(sample["png"]))
        mask_img.load()
        if train:
            ratio = rng.uniform(*cfg.scale_range)
            scale = min(crop_h, crop_w) * ratio / min(img.height, img.width)
            new = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
            img, mask_img = img.resize(new, Image.BILINEAR), mask_img.resize(new, Image.NEAREST)
            top = int(rng.integers(0, max(0, new[1] - crop_h) + 1))
            left = int(rng.integers(0, max(0, new[0] - crop_w) + 1))
            box = (left, top, left + min(crop_w, new[0]), top + min(crop_h, new[1]))
            img, mask_img = img.crop(box), mask_img.crop(box)
            if rng.random() < 0.5:
                img, mask_img = img.transpose(Image.FLIP_LEFT_RIGHT), mask_img.transpose(Image.FLIP_LEFT_RIGHT)
            image = F.pad(to_normalized(img), (0, crop_w - img.width, 0, crop_h - img.height))
        else:
            original = mask_img
            image, scale = preprocess(img)
            mask_img = mask_img.resize((round(img.width * scale) or 1, round(img.height * scale) or 1), Image.NEAREST)
        labels = MaskLabels.of(json.loads(sample["json"]))
        mask = mask_classes(np.asarray(mask_img), labels)
        mask = F.pad(mask, (0, crop_w - mask.shape[1], 0, crop_h - mask.shape[0]), value=IGNORE_INDEX)
        item = {"image": image, "mask": mask}
        if not train and cfg.original:
            item.update(mask_original=mask_classes(np.asarray(original), labels), scale=scale,
                        orig_size=(original.height, original.width))
        return item
    return decode


DECODERS = {"classification": classification_decoder, "detection": detection_decoder,
            "segmentation": segmentation_decoder}


def make_decoder(cfg: PipelineConfig, train: bool) -> Callable:
    return DECODERS[cfg.task](cfg, train)


def collate(items: list[dict]) -> dict:
    """Stack tensors (one shape per dataset, so a mismatch is an error) and numbers; detection boxes and
    their labels vary in count, original-size masks in size: they stay lists, as do other values."""
    ragged = ({"boxes", "labels"} if "boxes" in items[0] else set()) | {"mask_original"}
    batch = {}
    for key in items[0]:
        values = [item[key] for item in items]
        if key not in ragged and isinstance(values[0], torch.Tensor):
            batch[key] = torch.stack(values)
        elif key not in ragged and isinstance(values[0], (bool, int, float)):
            batch[key] = torch.tensor(values)
        else:
            batch[key] = values
    return batch


def own_generator() -> torch.Generator:
    """A DataLoader draws a base seed each time an iterator is made; from the global RNG by default, which
    would shift the random stream of training (noisy gating) by when a loader first runs, so a resumed run would
    not repeat the straight one. Our samples never use that seed (augmentation is keyed on seed and ordinal)."""
    return torch.Generator().manual_seed(0)


class DatasetLoader:
    """Batches of one dataset for one rank, in an order fixed by (seed, rank) that resumes exactly.

    The DataLoader hands out batches round-robin over its workers; a resumed loader restarts its workers
    from their last ordinals and re-orders their first batches so the round-robin continues where it stopped.
    """

    def __init__(self, shard_set: ShardSet, decode: Callable, batch_size: int, rank: int = 0, world: int = 1,
                 seed: int = 0, workers: int = 0, state: Optional[dict] = None,
                 exclude: Optional[dict[int, set[int]]] = None, pin_memory: bool = False):
        shard_set.check_split(world, workers)
        state = state or {}
        self.state = LoaderState(state.get("last"))
        self.workers = max(1, workers)
        self.next_worker = int(state.get("next_worker", 0))
        stream = TrainStream(shard_set, decode, rank, world, seed, resume=self.state.last, exclude=exclude)
        self.loader = DataLoader(stream, batch_size=batch_size, num_workers=workers, collate_fn=collate,
                                 worker_init_fn=worker_init if workers else None, persistent_workers=workers > 0,
                                 prefetch_factor=4 if workers else None, generator=own_generator(),
                                 pin_memory=pin_memory)
        self._iter = None
        self._pending: dict[int, collections.deque] = collections.defaultdict(collections.deque)

    def __iter__(self):
        return self

    def start(self) -> None:
        """Fork the workers (they then prefetch); the first batch does it otherwise."""
        if self._iter is None:
            self._iter = iter(self.loader)

    def __next__(self) -> dict:
        self.start()
        while not self._pending[self.next_worker]:
            batch = next(self._iter)
            self._pending[int(batch["__worker__"][0])].append(batch)
        batch = self._pending[self.next_worker].popleft()
        self.state.observe(batch)
        self.next_worker = (self.next_worker + 1) % self.workers
        return batch

    def state_dict(self) -> dict:
        return {"last": self.state.state_dict(), "next_worker": self.next_worker}


def eval_loader(shard_set: ShardSet, decode: Callable, batch_size: int, rank: int = 0, world: int = 1,
                workers: int = 0, only: Optional[dict[int, set[int]]] = None,
                pin_memory: bool = False) -> DataLoader:
    stream = EvalStream(shard_set, decode, rank, world, batch_size, only=only)
    return DataLoader(stream, batch_size=batch_size, num_workers=workers, collate_fn=collate,
                      worker_init_fn=worker_init if workers else None, generator=own_generator(),
                      pin_memory=pin_memory)

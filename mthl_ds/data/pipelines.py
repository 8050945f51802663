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
from mthl_ds.data.images import hsv_to_rgb, resize_bilinear, resize_nearest, rgb_from_bytes, rgb_to_hsv
from mthl_ds.data.reader import EvalStream, LoaderState, ShardSet, TrainStream, worker_init
from mthl_ds.data.shards import MaskLabels
from mthl_ds.geometry import IGNORE_INDEX, axis_scales, padded, rescale_factor, resized_extent

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


def to_normalized(img: Image.Image | np.ndarray) -> torch.Tensor:
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
    return lambda img: fit_and_pad(img, cfg.size, canvas)


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


def fit_and_pad(img: Image.Image, size: tuple[int, int],
                canvas: Optional[tuple[int, int]] = None) -> tuple[torch.Tensor, float]:
    """Resize keeping aspect to fit ``size`` (h, w), bilinear as mmcv's (:func:`resize_bilinear`), normalise,
    pad bottom/right with zeros (the mean colour) to ``canvas`` (default: ``size``)."""
    h, w = size
    canvas_h, canvas_w = canvas or size
    scale = min(h / img.height, w / img.width)
    new_h, new_w = resized_extent(img.height, img.width, scale)
    tensor = to_normalized(resize_bilinear(np.asarray(img), new_h, new_w))
    return F.pad(tensor, (0, canvas_w - new_w, 0, canvas_h - new_h)), scale


def detection_decoder(cfg: PipelineConfig, train: bool) -> Callable:
    """Training skips images without annotations and those with a side under 32 px (mmdet's COCO
    ``filter_cfg=dict(filter_empty_gt=True, min_size=32)``; crowd-only images stay, with no box to learn), and
    learns no crowd box nor one under 1 px wide or high or of area 0 (mmdet's ``CocoDataset``). Flip with boxes
    (train), resize keeping aspect to fit ``size`` (mmdet's ``Resize(keep_ratio=True)``), pad to the canvas,
    ``size`` padded up to a multiple of 32 (mmdet's ``Pad(size_divisor=32)``: 800 x 1333 -> 800 x 1344). Boxes
    become xyxy in canvas pixels, each axis scaled by its side's whole-pixel resize (mmdet's ``scale_factor``),
    those for training clipped to the resized image (``clip_object_border``);
    evaluation keeps every box (crowd ones flagged): COCO's evaluation reads them all.

    Portrait images: mmdet fits the long side to 1333 and the short side to 800 whatever the orientation, and
    groups each batch by orientation, so a 480 x 640 (w x h) image becomes 800 x 1067. Here every image of a
    dataset shares one landscape canvas, so a portrait image is fitted to the canvas height instead (600 x 800,
    0.75 of mmdet's scale). Deliberate: one shape per dataset keeps the expert-parallel ranks' token counts equal
    without grouping batches, and the loaders then resume exactly by sample ordinal (a grouping buffer would hold
    samples across a checkpoint)."""
    preprocess = eval_preprocess(cfg)

    def decode(sample: dict, rng: Optional[np.random.Generator]) -> Optional[dict]:
        meta = json.loads(sample["json"])
        if train and (not meta["boxes"] or min(meta["height"], meta["width"]) < 32):
            return None  # mmdet's filter_empty_gt and min_size: not trained on
        img = open_rgb(sample)
        boxes = torch.tensor(meta["boxes"], dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor(meta["labels"], dtype=torch.long)
        if train:
            areas = torch.tensor(meta["areas"]).reshape(-1) if "areas" in meta else boxes[:, 2] * boxes[:, 3]
            learnt = ((boxes[:, 2] >= 1) & (boxes[:, 3] >= 1) & (areas > 0)
                      & ~torch.tensor(meta["iscrowd"], dtype=torch.bool))
            boxes, labels = boxes[learnt], labels[learnt]
        boxes[:, 2:] += boxes[:, :2]
        if train and rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
            boxes = torch.stack([img.width - boxes[:, 2], boxes[:, 1], img.width - boxes[:, 0], boxes[:, 3]], 1)
        image, scale = preprocess(img)  # the same fit and pad in training
        boxes = boxes * torch.tensor(axis_scales(img.height, img.width, scale) * 2)
        if train:
            height, width = resized_extent(img.height, img.width, scale)
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        return {"image": image, "boxes": boxes, "labels": labels, "image_id": meta["image_id"],
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


def photometric_distortion(rng, img: np.ndarray) -> np.ndarray:
    """mmseg's ``PhotoMetricDistortion`` (its defaults), draw for draw, on an (H, W, 3) uint8 RGB image: each with
    probability 1/2, brightness + U(-32, 32), contrast x U(0.5, 1.5) (first or last, at random), saturation x
    U(0.5, 1.5), hue + an integer in [-18, 18) of 180; values clipped to [0, 255] and truncated at each step."""
    def convert(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
        return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    def contrast(x: np.ndarray) -> np.ndarray:
        return convert(x, alpha=rng.uniform(0.5, 1.5)) if rng.integers(2) else x
    if rng.integers(2):
        img = convert(img, beta=rng.uniform(-32, 32))
    contrast_first = rng.integers(2) == 1
    if contrast_first:
        img = contrast(img)
    if rng.integers(2):
        hsv = rgb_to_hsv(img)
        hsv[..., 1] = convert(hsv[..., 1], alpha=rng.uniform(0.5, 1.5))
        img = hsv_to_rgb(hsv)
    if rng.integers(2):
        hsv = rgb_to_hsv(img)
        hsv[..., 0] = (hsv[..., 0].astype(np.int64) + rng.integers(-18, 18)) % 180
        img = hsv_to_rgb(hsv)
    return img if contrast_first else contrast(img)


CAT_MAX_RATIO = 0.75  # mmseg's RandomCrop(cat_max_ratio=0.75)


def crop_origin(rng: np.random.Generator, classes: np.ndarray, crop_h: int, crop_w: int) -> tuple[int, int]:
    """(top, left) of a random crop of the (H, W) class map, drawn again (10 times at most) while one class covers
    ``CAT_MAX_RATIO`` or more of its labelled pixels, or it holds fewer than two classes: mmseg's ``RandomCrop``,
    draw for draw (the top offset, then the left one, each uniform over the valid offsets)."""
    height, width = classes.shape

    def draw() -> tuple[int, int]:
        return int(rng.integers(0, max(0, height - crop_h) + 1)), int(rng.integers(0, max(0, width - crop_w) + 1))
    top, left = draw()
    for _ in range(10):
        part = classes[top:top + crop_h, left:left + crop_w]
        counts = np.unique(part[part != IGNORE_INDEX], return_counts=True)[1]
        if len(counts) > 1 and counts.max() / counts.sum() < CAT_MAX_RATIO:
            break
        top, left = draw()
    return top, left


SEGMENTATION_LONG_SIDE = 4  # mmseg's ADE20K RandomResize scale (2048, 512): the long side's bound, in short sides


def random_rescale(rng: np.random.Generator, height: int, width: int, short: int,
                   ratio_range: tuple[float, float]) -> tuple[int, int]:
    """mmseg's ``RandomResize(scale=(4 x short, short), ratio_range, keep_ratio=True)``: one ratio drawn, both
    bounds times it truncated to whole pixels, the image fitted into them. Returns the new (h, w)."""
    ratio = rng.uniform(*ratio_range)
    scale = rescale_factor(height, width, int(short * ratio), int(SEGMENTATION_LONG_SIDE * short * ratio))
    return resized_extent(height, width, scale)


def segmentation_decoder(cfg: PipelineConfig, train: bool) -> Callable:
    """Train, mmseg's ADE20K pipeline: random rescale (:func:`random_rescale`), random crop
    (with ``cat_max_ratio``: :func:`crop_origin`; padding with the ignore index), flip, photometric distortion
    (:func:`photometric_distortion`). Eval: resize keeping aspect into the crop canvas, pad. Metrics use the
    resized mask."""
    crop_h, crop_w = cfg.size
    preprocess = eval_preprocess(cfg)

    def decode(sample: dict, rng: Optional[np.random.Generator]) -> dict:
        img = open_rgb(sample, png_is_mask=True)
        stored = Image.open(io.BytesIO(sample["png"]))
        stored.load()
        original = np.asarray(stored)
        labels = MaskLabels.of(json.loads(sample["json"]))
        if train:
            new_h, new_w = random_rescale(rng, img.height, img.width, min(crop_h, crop_w), cfg.scale_range)
            mask = resize_nearest(original, new_h, new_w)
            top, left = crop_origin(rng, mask_classes(mask, labels).numpy(), crop_h, crop_w)
            pixels = resize_bilinear(np.asarray(img), new_h, new_w, window=(top, left, crop_h, crop_w))
            mask = mask[top:top + crop_h, left:left + crop_w]
            if rng.random() < 0.5:
                pixels, mask = pixels[:, ::-1], mask[:, ::-1]
            pixels = photometric_distortion(rng, pixels)
            image = F.pad(to_normalized(pixels), (0, crop_w - pixels.shape[1], 0, crop_h - pixels.shape[0]))
        else:
            image, scale = preprocess(img)
            mask = resize_nearest(original, *resized_extent(img.height, img.width, scale))
        mask = mask_classes(mask, labels)
        mask = F.pad(mask, (0, crop_w - mask.shape[1], 0, crop_h - mask.shape[0]), value=IGNORE_INDEX)
        item = {"image": image, "mask": mask}
        if not train and cfg.original:
            item.update(mask_original=mask_classes(original, labels), scale=scale, orig_size=original.shape[:2])
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

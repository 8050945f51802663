"""WebDataset shard sets: the writer and its checks, and the ImageNet / COCO / ADE20K layouts (the downstream
layouts are in ``downstream.py``; ``convert.py`` dispatches to both).

One shard set = one folder holding ``000000.tar, 000001.tar, ...`` and ``index.json`` (task, sample
count, classes, shard names, per-shard sample counts and SHA-256). Image bytes are stored unchanged
(a mask is rewritten only when its values are mapped, e.g. Cityscapes label ids to train ids).
Tars are written with fixed metadata (mtime 0, uid/gid 0, sorted members), so identical input gives
byte-identical output whatever the number of workers. The schema of each task is in data_shards/README.md.

Bad input is checked here, once: an image that does not decode, a mask that does not decode or holds
a label that is neither a class nor the ignore value (:class:`MaskLabels`), and boxes of zero size or
outside the image are skipped, counted in ``index.json["skipped"]`` and reported naming the file.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import shutil
import tarfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Optional, Sequence, Union

import numpy as np
from PIL import Image
from tqdm import tqdm

from mthl_ds.data.images import ImageReadError, displayed_size, read_bytes

log = logging.getLogger("mthl_ds.shards")
INDEX = "index.json"
IMAGE_EXTS = {".jpeg", ".jpg", ".png"}


class ShardError(ValueError):
    """Input that cannot be converted or read; the message names the file."""


@dataclass
class Sample:
    """What a converter knows about one sample before reading it: key, source files, metadata."""
    key: str
    image: Path
    meta: dict = field(default_factory=dict)
    mask: Optional[Path] = None
    mask_lut: Optional[np.ndarray] = None  # segmentation: source mask value -> stored value (256 entries)


def image_ext(data: bytes) -> str:
    return "png" if data[:8] == b"\x89PNG\r\n\x1a\n" else "jpg"


@dataclass(frozen=True)
class MaskLabels:
    """How a segmentation set's mask values name classes. ``reduce_zero_label`` (ADE20K): 0 is unlabelled and
    value k is class k - 1; otherwise value k is class k (VOC, Cityscapes train ids). ``ignore_index`` is a value
    that is no class, ignored in the loss and the metrics (255 in VOC and Cityscapes). Each sample's json
    carries it, so a shard set describes itself; a sample without it is ADE20K's (shards written before)."""
    reduce_zero_label: bool = False
    ignore_index: int = 255

    def meta(self) -> dict:
        return {"reduce_zero_label": self.reduce_zero_label, "ignore_index": self.ignore_index}

    @classmethod
    def of(cls, meta: dict) -> "MaskLabels":
        return cls(meta.get("reduce_zero_label", True), meta.get("ignore_index", 255))


ADE20K_LABELS = MaskLabels(reduce_zero_label=True)


def check_mask(data: bytes, num_classes: int, labels: MaskLabels = ADE20K_LABELS) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        if img.mode not in ("L", "P"):
            raise ShardError(f"mask mode {img.mode} is not an 8-bit label map")
        values = np.unique(np.asarray(img))
    first = 1 if labels.reduce_zero_label else 0
    allowed = set(range(first, first + num_classes)) | {labels.ignore_index} | ({0} if first else set())
    bad = sorted({int(v) for v in values} - allowed)
    if bad:
        unlabelled = ", 0 unlabelled" if first else ""
        raise ShardError(f"mask label {bad[0]} is neither a class (values {first}-{first + num_classes - 1} for "
                         f"num_classes={num_classes}{unlabelled}) nor the ignore value {labels.ignore_index}")
    return img.size


def remap_mask(data: bytes, lut: np.ndarray) -> bytes:
    """A mask's values through a 256-entry table (e.g. Cityscapes label ids -> train ids), as an 8-bit PNG."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        if img.mode not in ("L", "P"):
            raise ShardError(f"mask mode {img.mode} is not an 8-bit label map")
        out = io.BytesIO()
        Image.fromarray(lut[np.asarray(img)].astype(np.uint8), mode="L").save(out, format="PNG")
    return out.getvalue()


def tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = len(data), 0, 0o444, 0, 0, "", ""
    tar.addfile(info, io.BytesIO(data))


def encode_sample(task: str, sample: Sample, num_classes: int) -> dict[str, bytes]:
    """Read and check one sample; returns its tar members by extension. Raises ShardError when unusable."""
    try:  # the stored bytes are the file's; readers apply its orientation (data.images), so its size is upright
        data = read_bytes(sample.image)
        width, height = displayed_size(data, sample.image)
    except ImageReadError as e:
        raise ShardError(str(e)) from None
    members = {image_ext(data): data}
    meta = dict(sample.meta)
    if task == "classification":
        members["cls"] = str(meta["class_id"]).encode()
    elif task == "detection":
        meta.update(width=width, height=height)
    elif task == "segmentation":
        labels = MaskLabels.of(meta)
        try:
            mask = sample.mask.read_bytes()
            if sample.mask_lut is not None:
                mask = remap_mask(mask, sample.mask_lut)
            if check_mask(mask, num_classes, labels) != (width, height):
                raise ShardError(f"mask size differs from image size {width}x{height}")
        except ShardError as e:
            raise ShardError(f"{sample.mask}: {e}") from None
        except Exception as e:
            raise ShardError(f"{sample.mask}: mask does not decode ({e})") from None
        members["png"] = mask
        members[image_ext(data) if image_ext(data) != "png" else "img.png"] = data
    members["json"] = json.dumps(meta, sort_keys=True).encode()
    return members


def write_one_shard(args) -> dict:
    task, samples, path, num_classes = args
    written, skipped = 0, []
    tmp = Path(str(path) + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tar:
        for sample in samples:
            try:
                members = encode_sample(task, sample, num_classes)
            except ShardError as e:
                skipped.append(str(e))
                continue
            for ext in sorted(members):
                tar_member(tar, f"{sample.key}.{ext}", members[ext])
            written += 1
    tmp.rename(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return {"name": path.name, "num_samples": written, "sha256": digest, "skipped": skipped}


def write_shard_set(task: str, samples: Sequence[Sample], out: Path, shard_size: int, workers: int, *,
                    classes: list, dataset: str, split: str, num_classes: int, extra: Optional[dict] = None,
                    force: bool = False) -> dict:
    """Write ``samples`` as a shard set in ``out`` (atomically: a complete set replaces the old one)."""
    if not samples:
        raise ShardError(f"no samples found for {dataset} {split}: nothing to write to {out}")
    if shard_size < 1:
        raise ShardError(f"shard size {shard_size} must be >= 1")
    check_keys(samples)
    if out.exists() and any(out.iterdir()) and not force:
        raise ShardError(f"{out} already holds files; pass --force to replace it")
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    chunks = [samples[i:i + shard_size] for i in range(0, len(samples), shard_size)]
    jobs = [(task, chunk, staging / f"{i:06d}.tar", num_classes) for i, chunk in enumerate(chunks)]
    bar = tqdm(total=len(samples), desc=f"{dataset}/{split}", unit="img", disable=None)
    results = []
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            for job, res in zip(jobs, pool.map(write_one_shard, jobs)):
                results.append(res)
                bar.update(len(job[1]))
    else:
        for job in jobs:
            results.append(write_one_shard(job))
            bar.update(len(job[1]))
    bar.close()
    problems = [p for r in results for p in r.pop("skipped")]
    for problem in problems:
        log.warning("skipped: %s", problem)
    shards = [r for r in results if r["num_samples"]]
    for r in results:
        if not r["num_samples"]:
            (staging / r["name"]).unlink()
    if not shards:
        shutil.rmtree(staging)
        raise ShardError(f"every sample of {dataset} {split} was unusable; first problem: {problems[0]}")
    index = {"task": task, "dataset": dataset, "split": split, "num_samples": sum(r["num_samples"] for r in shards),
             "num_classes": num_classes, "classes": classes, "shards": shards, "skipped": len(problems),
             **(extra or {})}
    (staging / INDEX).write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return index


def safe_key(stem: str) -> str:
    """WebDataset splits keys at the first dot."""
    return stem.replace(".", "_")


def path_key(rel: Union[str, PurePath]) -> str:
    """A sample key from an image's path relative to its dataset's image folder: its folders and stem joined by
    ``_``, so files of one stem in different folders get different keys."""
    return safe_key("_".join(PurePath(rel).with_suffix("").parts))


def id_key(image_id) -> str:
    """A sample key from an image id of an annotation file (COCO, iNaturalist, CUB): unique where the ids are."""
    return f"{image_id:012d}" if isinstance(image_id, int) and image_id >= 0 else safe_key(str(image_id))


def check_keys(samples: Sequence[Sample]) -> None:
    """Refuse two samples with one key before anything is written: the reader would yield only one of them."""
    first: dict[str, Sample] = {}
    for sample in samples:
        other = first.setdefault(sample.key, sample)
        if other is not sample:
            raise ShardError(f"{other.image} and {sample.image} would both be stored as sample {sample.key!r}; "
                             "rename one of them (keys come from the image id or the path within the dataset)")


# ----------------------------------------------------------------------------------------------- ImageNet

def imagenet_classes(root: Path) -> list[str]:
    mapping = root / "LOC_synset_mapping.txt"
    if mapping.is_file():
        return [line.split()[0] for line in mapping.read_text().splitlines() if line.strip()]
    train = root / "train"
    if not train.is_dir():
        raise ShardError(f"{root}: neither LOC_synset_mapping.txt nor train/<wnid>/ class folders found")
    return sorted(p.name for p in train.iterdir() if p.is_dir())


def imagenet_class_names(root: Path, classes: list[str]) -> list[str]:
    """Readable names from ``LOC_synset_mapping.txt`` ("n01440764 tench, Tinca tinca" -> "tench"); else the ids."""
    mapping = root / "LOC_synset_mapping.txt"
    if not mapping.is_file():
        return list(classes)
    names = {}
    for line in mapping.read_text().splitlines():
        wnid, _, text = line.strip().partition(" ")
        names[wnid] = text.split(",")[0].strip() or wnid
    return [names.get(c, c) for c in classes]


def read_val_labels(path: Path) -> dict[str, str]:
    """Label file of the flat val layout: LOC_val_solution.csv (ImageId,PredictionString) or 'file wnid' lines."""
    labels = {}
    if path.suffix == ".csv":
        with path.open() as f:
            for row in csv.DictReader(f):
                labels[row["ImageId"]] = row["PredictionString"].split()[0]
    else:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            parts = line.split()
            if len(parts) != 2:
                raise ShardError(f"{path}:{n}: expected 'filename wnid', got {line!r}")
            labels[Path(parts[0]).stem] = parts[1]
    return labels


def imagenet_samples(root: Path, split: str, labels: Optional[Path] = None) -> tuple[list[Sample], list[str]]:
    classes = imagenet_classes(root)
    index = {wnid: i for i, wnid in enumerate(classes)}
    folder = root / split
    if not folder.is_dir():
        raise ShardError(f"{folder}: split folder not found")
    samples = []
    class_dirs = sorted(p for p in folder.iterdir() if p.is_dir())
    if class_dirs:  # class-folder layout (train, or val after the usual re-foldering)
        for d in class_dirs:
            if d.name not in index:
                raise ShardError(f"{d}: class folder {d.name!r} is not in the class list ({len(classes)} classes)")
            for f in sorted(d.iterdir()):
                if f.suffix.lower() in IMAGE_EXTS:
                    samples.append(Sample(path_key(f.name), f, {"class_id": index[d.name], "wnid": d.name,
                                                                "file": f"{d.name}/{f.name}"}))
    else:  # flat val layout + label file
        labels = labels or root / "LOC_val_solution.csv"
        if not labels.is_file():
            raise ShardError(f"{folder} is a flat folder and its label file {labels} is missing")
        table = read_val_labels(labels)
        for f in sorted(folder.iterdir()):
            if f.suffix.lower() not in IMAGE_EXTS:
                continue
            if f.stem not in table:
                raise ShardError(f"{f}: no label in {labels}")
            wnid = table[f.stem]
            if wnid not in index:
                raise ShardError(f"{labels}: label {wnid!r} of {f.name} is not in the class list")
            samples.append(Sample(path_key(f.name), f, {"class_id": index[wnid], "wnid": wnid, "file": f.name}))
    return samples, classes


# ----------------------------------------------------------------------------------------------- COCO

def coco_samples(images: Path, annotations: Path) -> tuple[list[Sample], list[dict], dict[str, int]]:
    """Samples with boxes (COCO xywh), category ids, contiguous labels, iscrowd, areas and annotation ids."""
    try:
        data = json.loads(annotations.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ShardError(f"{annotations}: cannot read COCO annotations ({e})") from None
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise ShardError(f"{annotations}: missing key {key!r}")
    categories = sorted(data["categories"], key=lambda c: c["id"])
    label_of = {c["id"]: i for i, c in enumerate(categories)}
    by_image: dict[int, list] = {}
    for ann in data["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    samples, dropped = [], {"bad_box": 0}
    for img in sorted(data["images"], key=lambda i: i["id"]):
        boxes, cats, labels, crowd, areas, ids = [], [], [], [], [], []
        for ann in sorted(by_image.get(img["id"], []), key=lambda a: a["id"]):
            x, y, w, h = ann["bbox"]
            if w <= 0 or h <= 0 or x >= img["width"] or y >= img["height"] or x + w <= 0 or y + h <= 0:
                log.warning("%s: annotation %s of image %s (%s) has an empty or outside box %s; dropped",
                            annotations, ann["id"], img["id"], img["file_name"], ann["bbox"])
                dropped["bad_box"] += 1
                continue
            if ann["category_id"] not in label_of:
                raise ShardError(f"{annotations}: annotation {ann['id']} has unknown category {ann['category_id']}")
            boxes.append([float(v) for v in ann["bbox"]])
            cats.append(ann["category_id"])
            labels.append(label_of[ann["category_id"]])
            crowd.append(int(ann.get("iscrowd", 0)))
            areas.append(float(ann.get("area", w * h)))
            ids.append(ann["id"])
        meta = {"image_id": img["id"], "file_name": img["file_name"], "boxes": boxes, "category_ids": cats,
                "labels": labels, "iscrowd": crowd, "areas": areas, "ann_ids": ids}
        samples.append(Sample(id_key(img["id"]), images / img["file_name"], meta))
    return samples, categories, dropped


# ----------------------------------------------------------------------------------------------- ADE20K

ADE_SPLITS = {"train": "training", "val": "validation", "training": "training", "validation": "validation"}


def ade20k_classes(root: Path) -> list[str]:
    info = root / "objectInfo150.csv"
    if not info.is_file():
        return [str(i) for i in range(1, 151)]
    with info.open() as f:
        return [row["Name"] for row in csv.DictReader(f)]


def ade20k_samples(root: Path, split: str) -> tuple[list[Sample], list[str]]:
    folder = ADE_SPLITS.get(split)
    if folder is None:
        raise ShardError(f"ADE20K split {split!r} must be one of {sorted(ADE_SPLITS)}")
    images, masks = root / "images" / folder, root / "annotations" / folder
    for d in (images, masks):
        if not d.is_dir():
            raise ShardError(f"{d}: folder not found (expected the ADEChallengeData2016 layout)")
    samples = []
    for f in sorted(images.iterdir()):
        if f.suffix.lower() not in IMAGE_EXTS:
            continue
        mask = masks / f"{f.stem}.png"
        if not mask.is_file():
            raise ShardError(f"{f}: its mask {mask} is missing")
        samples.append(Sample(path_key(f.name), f, {"file": f.name, **ADE20K_LABELS.meta()}, mask=mask))
    return samples, ade20k_classes(root)

"""``mthl-ds shards KIND``: one split of a dataset in its own layout -> a shard set. The layouts: ImageNet, COCO,
ADE20K (``shards.py``); imagefolder, pets, cub, cars, places365, inat2018, voc, cityscapes, nyu, masks
(``downstream.py``)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from mthl_ds.data import downstream
from mthl_ds.data.shards import (ShardError, ade20k_samples, coco_samples, imagenet_class_names, imagenet_samples,
                                 write_shard_set)

KINDS = ("imagenet", "coco", "ade20k", "imagefolder", "pets", "cub", "cars", "places365", "inat2018", "voc",
         "cityscapes", "nyu", "masks")
CLASSIFICATION = {"pets": downstream.pets_samples, "cub": downstream.cub_samples, "cars": downstream.cars_samples,
                  "places365": downstream.places365_samples, "inat2018": downstream.inat2018_samples}
VOC_AP = ("11point", "area")


def class_names(path: Optional[Path], num_classes: Optional[int], what: str) -> list[str]:
    """Names from a file (one per line), else '0'..'C-1'; one of the two is needed."""
    if path:
        try:
            names = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
        except OSError as e:
            raise ShardError(f"{path}: cannot read class names ({e})") from None
        if num_classes is not None and num_classes != len(names):
            raise ShardError(f"{path} names {len(names)} classes, --num-classes says {num_classes}")
        return names
    if num_classes is None:
        raise ShardError(f"{what}: give --num-classes or --classes FILE (one name per line)")
    return [str(i) for i in range(num_classes)]


def convert(dataset_kind: str, out: Path, *, split: str, shard_size: int = 256, workers: int = 1,
            root: Optional[Path] = None, images: Optional[Path] = None, annotations: Optional[Path] = None,
            labels: Optional[Path] = None, num_classes: Optional[int] = None, name: Optional[str] = None,
            force: bool = False, masks: Optional[Path] = None, classes: Optional[Path] = None,
            ignore_index: int = 255, label_map: Optional[Path] = None, year: str = "2007",
            ap: Optional[str] = None) -> dict:
    """Convert one split of a dataset in its own layout to a shard set in ``out``."""
    def write(task, samples, names, extra=None, n=None):
        return write_shard_set(task, samples, out, shard_size, workers, classes=names, dataset=name or dataset_kind,
                               split=split, num_classes=n or len(names), force=force, extra=extra)

    def need(value, flag):
        if value is None:
            raise ShardError(f"shards {dataset_kind}: {flag} is required")
        return Path(value)

    if dataset_kind == "imagenet":
        samples, wnids = imagenet_samples(need(root, "--root"), split, labels)
        return write("classification", samples, wnids, {"class_names": imagenet_class_names(root, wnids)})
    if dataset_kind == "coco":
        samples, categories, dropped = coco_samples(need(images, "--images"), need(annotations, "--annotations"))
        return write("detection", samples, categories, {"dropped_boxes": dropped["bad_box"]})
    if dataset_kind == "ade20k":
        samples, names = ade20k_samples(need(root, "--root"), split)
        n = num_classes or len(names)
        return write("segmentation", samples, names[:n], n=n)
    if dataset_kind == "imagefolder":
        samples, names = downstream.imagefolder_samples(need(root, "--root"))
        return write("classification", samples, names, {"class_names": names})
    if dataset_kind in CLASSIFICATION:
        samples, names, missing = CLASSIFICATION[dataset_kind](need(root, "--root"), split)
        return write("classification", samples, names, {"class_names": names, "missing_samples": missing})
    if dataset_kind == "voc":
        if ap is not None and ap not in VOC_AP:
            raise ShardError(f"--ap {ap!r} must be one of {VOC_AP}")
        samples, categories, dropped = downstream.voc_samples(need(root, "--root"), year, split)
        # VOC's own devkit: 11-point AP up to VOC2007, the area under the precision envelope from VOC2010 on
        ap = ap or ("11point" if int(year) <= 2007 else "area")
        return write("detection", samples, categories, {"metric": "voc", "voc_ap": ap, "voc_year": year,
                                                        "dropped_boxes": dropped["bad_box"] + dropped["unknown_class"],
                                                        "missing_samples": dropped["missing"]})
    if dataset_kind == "cityscapes":
        samples, names, missing = downstream.cityscapes_samples(need(root, "--root"), split)
        return write("segmentation", samples, names, {"ignore_index": 255, "missing_samples": missing})
    if dataset_kind == "nyu":
        samples, names = downstream.nyu_samples(need(root, "--root"), split)
        return write("segmentation", samples, names)
    if dataset_kind == "masks":
        samples = downstream.masks_samples(need(images, "--images"), need(masks, "--masks"),
                                           ignore_index=ignore_index, label_map=label_map)
        names = class_names(classes, num_classes, "shards masks")
        return write("segmentation", samples, names, {"ignore_index": ignore_index})
    raise ShardError(f"unknown dataset kind {dataset_kind!r}; choose one of {', '.join(KINDS)}")


def convert_world(roots: dict[str, Path], out: Path, shard_size: int = 64, workers: int = 1,
                  progress: Callable[[str], None] = print, force: bool = False) -> dict[str, Path]:
    """Convert every dataset of the synthetic world (train and val) with the same converters as real data."""
    sets = {}
    # (name, kind, the layout's own split names for train and val)
    for name, kind, splits in (("imagenet", "imagenet", ("train", "val")), ("coco", "coco", ("train", "val")),
                               ("ade20k", "ade20k", ("train", "val")), ("pets", "pets", ("trainval", "test")),
                               ("streets", "cityscapes", ("train", "val")), ("voc", "voc", ("trainval", "test"))):
        for split, source_split in zip(("train", "val"), splits):
            dest = out / name / split
            if kind == "coco":
                convert("coco", dest, split=split, images=roots[name] / f"{split}2017",
                        annotations=roots[name] / "annotations" / f"instances_{split}2017.json",
                        shard_size=shard_size, workers=workers, name=name, force=force)
            else:
                convert(kind, dest, split=source_split, root=roots[name], shard_size=shard_size, workers=workers,
                        name=name, force=force)
            progress(f"shards: {dest}")
        sets[name] = out / name
    return sets

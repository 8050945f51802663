"""The paper's downstream datasets (Tables 2 and 3) in their own layouts, listed as samples for the shard writer.

Where torchvision's dataset classes parse a layout they are used for the listing (file names, labels, the VOC
XML, the Cars .mat files): ImageFolder, OxfordIIITPet, StanfordCars, VOCDetection, Cityscapes. They never decode
an image here; the shard writer reads and checks every file (shards.encode_sample). Parsed here: CUB-200-2011 and
NYUv2-40 (no torchvision class), Places365 (torchvision's checks the list files' MD5, so only the untouched
official lists pass) and iNaturalist 2018 (torchvision's reads the folder tree, which has no 2018 train / val
split; the JSON is the split). ``masks`` is the generic segmentation layout (an image folder and a mask folder).

A layout problem the whole set shares (a missing folder or list file) is refused before any shard is written;
a problem of one sample (a missing image, XML or mask, a box outside its image, an unknown class name) skips that
sample or box, counted in the index and logged naming the file, as the ImageNet / COCO / ADE20K converters do.
"""
from __future__ import annotations

import json
import logging
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Optional

import numpy as np

from mthl_ds.data.shards import IMAGE_EXTS, MaskLabels, Sample, ShardError, id_key, path_key, safe_key

log = logging.getLogger("mthl_ds.shards")

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")


def torchvision_listing(cls, what: str, *args, **kwargs):
    """A torchvision dataset object used for its file lists; its 'not found' errors become ShardError."""
    try:
        return cls(*args, **kwargs)
    except (RuntimeError, ValueError, FileNotFoundError) as e:
        raise ShardError(f"{what}: {e}") from None


def present(samples: list[Sample], dataset: str) -> tuple[list[Sample], int]:
    """Drop samples whose image (or mask) file is missing, naming each; returns (kept, dropped)."""
    kept = []
    for s in samples:
        missing = [p for p in (s.image, s.mask) if p is not None and not p.is_file()]
        if missing:
            log.warning("%s: %s is missing; sample skipped", dataset, missing[0])
        else:
            kept.append(s)
    return kept, len(samples) - len(kept)


# ------------------------------------------------------------------------------------------- classification

def imagefolder_samples(root: Path) -> tuple[list[Sample], list[str]]:
    """``root/<class>/<image>``, any class names (torchvision ImageFolder: classes sorted, files sorted)."""
    from torchvision.datasets import ImageFolder
    folder = torchvision_listing(ImageFolder, str(root), str(root),
                                 is_valid_file=lambda p: Path(p).suffix.lower() in IMAGE_EXTS)
    samples = []
    for path, label in folder.samples:
        rel = Path(path).relative_to(root)
        samples.append(Sample(path_key(rel), Path(path),
                              {"class_id": label, "file": rel.as_posix()}))
    return samples, list(folder.classes)


PET_SPLITS = {"train": "trainval", "trainval": "trainval", "val": "test", "test": "test"}


def pets_samples(root: Path, split: str) -> tuple[list[Sample], list[str], int]:
    """Oxford-IIIT Pet as distributed: ``root/images/*.jpg``, ``root/annotations/{trainval,test}.txt`` (torchvision
    OxfordIIITPet; ``root`` is the ``oxford-iiit-pet`` folder). 37 breeds; val is the test list."""
    from torchvision.datasets import OxfordIIITPet
    if split not in PET_SPLITS:
        raise ShardError(f"Oxford-IIIT Pet split {split!r} must be one of {sorted(PET_SPLITS)}")
    root = Path(root)
    if root.name != "oxford-iiit-pet":
        raise ShardError(f"{root}: expected the oxford-iiit-pet folder (holding images/ and annotations/)")
    pets = torchvision_listing(OxfordIIITPet, str(root), str(root.parent), split=PET_SPLITS[split])
    samples = [Sample(path_key(p.name), p, {"class_id": label, "file": p.name})
               for p, label in zip(pets._images, pets._labels)]
    samples, missing = present(samples, "pets")
    return samples, list(pets.classes), missing


def cub_samples(root: Path, split: str) -> tuple[list[Sample], list[str], int]:
    """CUB-200-2011 as distributed (``root`` = CUB_200_2011): images.txt (id path), image_class_labels.txt (id
    class 1..200), train_test_split.txt (id 1 = train, 0 = test), classes.txt (class name); images/<path>."""
    if split not in ("train", "val", "test"):
        raise ShardError(f"CUB split {split!r} must be train or test (val = test)")
    tables = {}
    for name in ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt"):
        path = root / name
        if not path.is_file():
            raise ShardError(f"{path}: not found (expected the CUB_200_2011 layout)")
        rows = {}
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                parts = line.split(maxsplit=1)
                if len(parts) != 2:
                    raise ShardError(f"{path}:{n}: expected '<id> <value>', got {line!r}")
                rows[int(parts[0])] = parts[1].strip()
        tables[name] = rows
    classes = [tables["classes.txt"][i] for i in sorted(tables["classes.txt"])]
    want = "1" if split == "train" else "0"
    samples = []
    for image_id, rel in sorted(tables["images.txt"].items()):
        if image_id not in tables["train_test_split.txt"] or image_id not in tables["image_class_labels.txt"]:
            raise ShardError(f"{root}: image {image_id} ({rel}) has no split or no class line")
        if tables["train_test_split.txt"][image_id] != want:
            continue
        label = int(tables["image_class_labels.txt"][image_id]) - 1
        if not 0 <= label < len(classes):
            raise ShardError(f"{root / 'image_class_labels.txt'}: image {image_id} has class {label + 1}, "
                             f"not in classes.txt (1-{len(classes)})")
        samples.append(Sample(id_key(image_id), root / "images" / rel,
                              {"class_id": label, "file": rel, "image_id": image_id}))
    samples, missing = present(samples, "cub")
    return samples, classes, missing


def cars_samples(root: Path, split: str) -> tuple[list[Sample], list[str], int]:
    """Stanford Cars with its devkit (torchvision StanfordCars; ``root`` is the ``stanford_cars`` folder):
    devkit/cars_meta.mat, devkit/cars_train_annos.mat + cars_train/, cars_test_annos_withlabels.mat + cars_test/."""
    from torchvision.datasets import StanfordCars
    if split not in ("train", "val", "test"):
        raise ShardError(f"Stanford Cars split {split!r} must be train or test (val = test)")
    root = Path(root)
    if root.name != "stanford_cars":
        raise ShardError(f"{root}: expected the stanford_cars folder (holding devkit/, cars_train/, cars_test/)")
    cars = torchvision_listing(StanfordCars, str(root), str(root.parent), split="train" if split == "train" else "test")
    samples = [Sample(path_key(Path(path).name), Path(path), {"class_id": int(label), "file": Path(path).name})
               for path, label in cars._samples]
    samples, missing = present(samples, "cars")
    return samples, [str(c) for c in cars.classes], missing


PLACES_SPLITS = {"train": "train_standard", "val": "val"}


def places365_samples(root: Path, split: str, small: bool = False) -> tuple[list[Sample], list[str], int]:
    """Places365-Standard as distributed: categories_places365.txt ('/a/airfield 0'), places365_train_standard.txt
    ('/a/airfield/00000001.jpg 0') with data_large_standard/ (data_256_standard/ for the small images),
    places365_val.txt ('Places365_val_00000001.jpg 165') with val_large/ (val_256/). The same files torchvision's
    Places365 reads; it is not used because it also checks their MD5 against the official lists, which refuses
    any subset or re-packaging of them."""
    if split not in PLACES_SPLITS:
        raise ShardError(f"Places365 split {split!r} must be one of {sorted(PLACES_SPLITS)}")
    size = "256" if small else "large"
    images = root / (f"data_{size}_standard" if split == "train" else f"val_{size}")
    lists = {name: root / name for name in ("categories_places365.txt", f"places365_{PLACES_SPLITS[split]}.txt")}
    for path in (*lists.values(), images):
        if not path.exists():
            raise ShardError(f"{path}: not found (expected the Places365-Standard layout)")
    index = {}
    for n, line in enumerate(lists["categories_places365.txt"].read_text().splitlines(), 1):
        if line.strip():
            try:
                name, i = line.split()
                index[int(i)] = name
            except ValueError:
                raise ShardError(f"{lists['categories_places365.txt']}:{n}: expected '<category> <index>'") from None
    classes = [index[i] for i in sorted(index)]
    position = {i: n for n, i in enumerate(sorted(index))}
    samples = []
    listing = lists[f"places365_{PLACES_SPLITS[split]}.txt"]
    for n, line in enumerate(listing.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit() or int(parts[1]) not in index:
            raise ShardError(f"{listing}:{n}: expected '<image> <category index>', got {line!r}")
        rel = parts[0].lstrip("/")
        samples.append(Sample(path_key(rel), images / rel,
                              {"class_id": position[int(parts[1])], "file": rel}))
    samples, missing = present(samples, "places365")
    return samples, classes, missing


def inat2018_samples(root: Path, split: str) -> tuple[list[Sample], list[str], int]:
    """iNaturalist 2018 as distributed: {train,val}2018.json (COCO-style images, annotations and categories; the
    categories may instead be in categories.json) with the images under ``root`` at each ``file_name``
    (train_val2018/<kingdom>/<category>/<hash>.jpg). torchvision's INaturalist reads only the folder tree of an
    extracted archive, which has no train / val split for 2018: the JSON is the split."""
    if split not in ("train", "val"):
        raise ShardError(f"iNaturalist 2018 split {split!r} must be train or val")
    path = root / f"{split}2018.json"
    try:
        data = json.loads(path.read_text())
        categories = data.get("categories") or json.loads((root / "categories.json").read_text())
        label_of = {c["id"]: i for i, c in enumerate(sorted(categories, key=lambda c: c["id"]))}
        names = [c["name"] for c in sorted(categories, key=lambda c: c["id"])]
        category_of = {a["image_id"]: a["category_id"] for a in data["annotations"]}
        images = sorted(data["images"], key=lambda i: i["id"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ShardError(f"{path}: cannot read the iNaturalist 2018 annotations ({type(e).__name__}: {e})") from None
    samples = []
    for img in images:
        if img["id"] not in category_of or category_of[img["id"]] not in label_of:
            raise ShardError(f"{path}: image {img['id']} ({img['file_name']}) has no annotation with a known category")
        samples.append(Sample(id_key(img["id"]), root / img["file_name"],
                              {"class_id": label_of[category_of[img["id"]]], "category_id": category_of[img["id"]],
                               "image_id": img["id"], "file": img["file_name"]}))
    samples, missing = present(samples, "inat2018")
    return samples, names, missing


# ------------------------------------------------------------------------------------------------ detection

def voc_samples(root: Path, year: str, split: str) -> tuple[list[Sample], list[dict], dict[str, int]]:
    """PASCAL VOC as distributed (``root`` holds VOCdevkit/VOC<year>/): ImageSets/Main/<split>.txt,
    JPEGImages/<id>.jpg, Annotations/<id>.xml, read with torchvision VOCDetection's XML parser.

    Boxes become COCO-style xywh in continuous pixel coordinates: VOC's 1-based inclusive (xmin, xmax) is the
    span [xmin - 1, xmax]. ``difficult`` boxes are kept and flagged (``difficult``, and ``iscrowd`` so training
    drops them as mmdet's VOC pipeline ignores them); the VOC metric neither rewards nor punishes them."""
    from torchvision.datasets import VOCDetection
    voc = torchvision_listing(VOCDetection, str(root / "VOCdevkit" / f"VOC{year}"), str(root), year=year,
                              image_set=split)
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(VOC_CLASSES)]
    label_of = {n: i for i, n in enumerate(VOC_CLASSES)}
    jpegs = root / "VOCdevkit" / f"VOC{year}" / "JPEGImages"
    samples, dropped = [], {"bad_box": 0, "unknown_class": 0, "missing": 0}
    for number, (image, xml) in enumerate(zip(voc.images, voc.annotations), 1):
        image, xml = Path(image), Path(xml)
        if not image.is_file() or not xml.is_file():
            log.warning("voc: %s is missing; sample skipped", image if not image.is_file() else xml)
            dropped["missing"] += 1
            continue
        try:
            ann = voc.parse_voc_xml(ElementTree.parse(xml).getroot())["annotation"]
            width, height = int(ann["size"]["width"]), int(ann["size"]["height"])
        except Exception as e:  # a broken XML is one sample's problem
            log.warning("voc: %s does not parse (%s); sample skipped", xml, e)
            dropped["missing"] += 1
            continue
        objects = ann.get("object", [])
        objects = objects if isinstance(objects, list) else [objects]
        boxes, labels, cats, difficult = [], [], [], []
        for obj in objects:
            name = obj["name"].strip()
            if name not in label_of:
                log.warning("%s: unknown class %r (not one of VOC's 20); box dropped", xml, name)
                dropped["unknown_class"] += 1
                continue
            b = obj["bndbox"]
            x0, y0, x1, y1 = (float(b[k]) for k in ("xmin", "ymin", "xmax", "ymax"))
            x0, y0 = x0 - 1, y0 - 1
            if x1 <= x0 or y1 <= y0 or x0 < 0 or y0 < 0 or x1 > width or y1 > height:
                log.warning("%s: box %s of %r is empty or outside the %dx%d image; dropped", xml,
                            [b[k] for k in ("xmin", "ymin", "xmax", "ymax")], name, width, height)
                dropped["bad_box"] += 1
                continue
            boxes.append([x0, y0, x1 - x0, y1 - y0])
            labels.append(label_of[name])
            cats.append(label_of[name] + 1)
            difficult.append(int(obj.get("difficult", "0") or 0))
        meta = {"image_id": number, "file_name": image.name, "boxes": boxes, "category_ids": cats, "labels": labels,
                "iscrowd": difficult, "difficult": difficult, "areas": [w * h for _, _, w, h in boxes],
                "ann_ids": [number * 1000 + i for i in range(len(boxes))]}
        samples.append(Sample(path_key(image.relative_to(jpegs)), image, meta))  # the id of ImageSets/Main
    return samples, categories, dropped


# --------------------------------------------------------------------------------------------- segmentation

def cityscapes_samples(root: Path, split: str) -> tuple[list[Sample], list[str], int]:
    """Cityscapes as distributed: leftImg8bit/<split>/<city>/*_leftImg8bit.png and gtFine/<split>/<city>/
    *_gtFine_labelIds.png (torchvision Cityscapes lists them). Label ids map to the 19 train ids; every other id
    (void, and the classes Cityscapes does not evaluate) becomes 255, ignored."""
    from torchvision.datasets import Cityscapes
    city = torchvision_listing(Cityscapes, str(root), str(root), split=split, mode="fine", target_type="semantic")
    lut = np.full(256, 255, dtype=np.uint8)
    names = {}
    for c in Cityscapes.classes:
        if 0 <= c.id < 256 and 0 <= c.train_id < 255:
            lut[c.id] = c.train_id
            names[c.train_id] = c.name
    classes = [names[i] for i in sorted(names)]
    labels = MaskLabels(reduce_zero_label=False, ignore_index=255)
    samples = []
    for image, (target,) in sorted(zip(city.images, city.targets)):
        image, target = Path(image), Path(target)
        samples.append(Sample(safe_key(image.stem.replace("_leftImg8bit", "")), image,
                              {"file": image.relative_to(root).as_posix(), **labels.meta()}, mask=target,
                              mask_lut=lut))
    samples, missing = present(samples, "cityscapes")
    return samples, classes, missing


NYU40_CLASSES = ("wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf", "picture",
                 "counter", "blinds", "desk", "shelves", "curtain", "dresser", "pillow", "mirror", "floor mat",
                 "clothes", "ceiling", "books", "refridgerator", "television", "paper", "towel", "shower curtain",
                 "box", "whiteboard", "person", "night stand", "toilet", "sink", "lamp", "bathtub", "bag",
                 "otherstructure", "otherfurniture", "otherprop")


def nyu_samples(root: Path, split: str) -> tuple[list[Sample], list[str]]:
    """NYU Depth v2, 40 classes, in the image / label PNG layout of mmseg-style NYUv2 datasets: images/<split>/
    <name>.{jpg,png} and annotations/<split>/<name>.png, labels 1-40 (Gupta et al.'s 40 classes) and 0 unlabelled,
    read as ADE20K's (0 ignored, k is class k - 1). mmseg itself ships NYU for depth only; a 40-class layout that
    stores 0-39 with 255 converts with ``masks --num-classes 40``."""
    images, masks = root / "images" / split, root / "annotations" / split
    for d in (images, masks):
        if not d.is_dir():
            raise ShardError(f"{d}: folder not found (expected NYU's images/<split>/ and annotations/<split>/)")
    labels = MaskLabels(reduce_zero_label=True, ignore_index=255)
    samples = []
    for f in sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_EXTS):
        mask = masks / f"{f.stem}.png"
        if not mask.is_file():
            raise ShardError(f"{f}: its mask {mask} is missing")
        samples.append(Sample(path_key(f.name), f, {"file": f.name, **labels.meta()}, mask=mask))
    return samples, list(NYU40_CLASSES)


def read_label_map(path: Path, ignore_index: int) -> np.ndarray:
    """A JSON object {source value: class id}; values it does not name become ``ignore_index``."""
    try:
        mapping = json.loads(Path(path).read_text())
        lut = np.full(256, ignore_index, dtype=np.uint8)
        for source, target in mapping.items():
            if not (0 <= int(source) < 256 and 0 <= int(target) < 256):
                raise ValueError(f"{source}: {target} is outside 0-255")
            lut[int(source)] = int(target)
    except (OSError, ValueError, AttributeError, TypeError) as e:
        raise ShardError(f"{path}: not a label map {{\"source value\": class id}} ({e})") from None
    return lut


def masks_samples(images: Path, masks: Path, *, ignore_index: int = 255,
                  label_map: Optional[Path] = None) -> list[Sample]:
    """Generic segmentation: ``images/<name>.<jpg|png>`` with ``masks/<name>.png`` (the same relative path), 8-bit
    label maps holding class ids 0..C-1 and ``ignore_index``; ``label_map`` first maps the stored values."""
    for d in (images, masks):
        if not d.is_dir():
            raise ShardError(f"{d}: folder not found")
    lut = read_label_map(label_map, ignore_index) if label_map else None
    labels = MaskLabels(reduce_zero_label=False, ignore_index=ignore_index)
    samples = []
    for f in sorted(p for p in images.rglob("*") if p.suffix.lower() in IMAGE_EXTS):
        rel = f.relative_to(images)
        mask = masks / rel.with_suffix(".png")
        if not mask.is_file():
            raise ShardError(f"{f}: its mask {mask} is missing")
        samples.append(Sample(path_key(rel), f,
                              {"file": rel.as_posix(), **labels.meta()}, mask=mask, mask_lut=lut))
    return samples

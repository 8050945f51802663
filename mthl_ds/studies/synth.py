"""A small, learnable synthetic world written in the datasets' *real* on-disk layouts.

- ``imagenet/``: ILSVRC class folders ``train/<wnid>/<wnid>_<i>.JPEG`` and the flat val layout
  ``val/ILSVRC2012_val_<i>.JPEG`` with its label file ``LOC_val_solution.csv``.
- ``coco/``: ``train2017/``, ``val2017/`` JPEGs and ``annotations/instances_{train,val}2017.json``.
- ``ADEChallengeData2016/``: ``images/{training,validation}/*.jpg`` and 8-bit PNG masks in
  ``annotations/{training,validation}/*.png`` (0 = unlabeled, 1..N = classes).
- Downstream datasets for adaptation, in the layouts of the paper's downstream sets: ``pets/oxford-iiit-pet/``
  (new classes, the Oxford-IIIT Pet layout), ``streets/cityscapes/`` (a new scene style, the Cityscapes layout:
  label ids, mapped to the 19 train ids by the converter) and ``voc/VOCdevkit/VOC2007/`` (new objects, the
  PASCAL VOC layout, small boxes flagged ``difficult``).

Every image is drawn from a generator keyed on (seed, dataset, split, index), so the world is identical for
identical arguments, whatever the order of generation.
"""
from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("disc", "square", "triangle", "cross", "ring", "star", "diamond", "bar")
PALETTE = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 80, 220), "yellow": (230, 210, 40),
           "magenta": (200, 50, 200), "cyan": (40, 200, 210), "orange": (240, 140, 30), "white": (240, 240, 240)}


@dataclass(frozen=True)
class WorldSize:
    """Images per split. ``scale`` multiplies every count."""
    cls_train_per_class: int = 20
    cls_val_per_class: int = 10
    # COCO val: 240 images, so that the mAP measures training rather than which images the val set drew
    det_train: int = 240
    det_val: int = 240
    seg_train: int = 160
    seg_val: int = 40
    voc_trainval: int = 120
    voc_test: int = 60

    def scaled(self, scale: float) -> "WorldSize":
        return WorldSize(*(max(1, round(v * scale)) for v in vars(self).values()))


# 40 classes, every shape in 5 colours: the colour alone narrows a class down to 8, so top-5 measures shape too
IMAGENET_CLASSES = [(s, c) for s in SHAPES for c in ("red", "blue", "green", "yellow", "white")]
PETS_CLASSES = [("star", "orange"), ("diamond", "cyan"), ("bar", "magenta"), ("star", "cyan"), ("diamond", "orange")]
COCO_CATEGORIES = [(1, "disc", "red"), (3, "square", "green"), (7, "triangle", "blue")]  # COCO ids are sparse
ADE_CLASSES = [("sky", (110, 160, 230)), ("grass", (60, 150, 60)), ("road", (120, 120, 120)),
               ("building", (150, 100, 70))]
STREETS_CLASSES = [("night_sky", (20, 20, 60)), ("asphalt", (50, 50, 55)), ("lamp", (250, 220, 120))]


def rng_for(seed: int, *key: object) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32("/".join(map(str, key)).encode())])


def noisy_background(rng: np.random.Generator, h: int, w: int, base=None) -> np.ndarray:
    base = rng.integers(60, 180, size=3) if base is None else np.asarray(base)
    img = base[None, None, :] + rng.normal(0, 18, size=(h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], color) -> None:
    x0, y0, x1, y1 = box
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    if shape == "disc":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=color)
    elif shape == "cross":
        t = max(2, int(r / 3))
        draw.rectangle((cx - t, y0, cx + t, y1), fill=color)
        draw.rectangle((x0, cy - t, x1, cy + t), fill=color)
    elif shape == "ring":
        draw.ellipse(box, outline=color, width=max(2, int(r / 3)))
    elif shape == "star":
        pts = [(cx + (r if i % 2 == 0 else r / 2.5) * np.cos(np.pi * i / 5 - np.pi / 2),
                cy + (r if i % 2 == 0 else r / 2.5) * np.sin(np.pi * i / 5 - np.pi / 2)) for i in range(10)]
        draw.polygon(pts, fill=color)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=color)
    elif shape == "bar":
        draw.rectangle((x0, cy - r / 4, x1, cy + r / 4), fill=color)
    else:
        raise ValueError(shape)


def save_jpeg(img: np.ndarray | Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    (img if isinstance(img, Image.Image) else Image.fromarray(img)).save(path, format="JPEG", quality=90)


def classification_image(rng: np.random.Generator, shape: str, color: str, size: int = 96) -> Image.Image:
    img = Image.fromarray(noisy_background(rng, size, size))
    r = int(rng.integers(size // 5, size // 3))
    cx, cy = rng.integers(r, size - r, size=2)
    draw_shape(ImageDraw.Draw(img), shape, (cx - r, cy - r, cx + r, cy + r), PALETTE[color])
    return img


def write_classification(root: Path, classes, seed: int, name: str, train_per_class: int, val_per_class: int) -> None:
    """ILSVRC layout: train/<wnid>/<wnid>_<i>.JPEG; val/ILSVRC2012_val_<i>.JPEG + LOC_val_solution.csv."""
    wnids = [f"n{90000000 + 1000 * len(name) + i:08d}" for i in range(len(classes))]
    for c, (wnid, (shape, color)) in enumerate(zip(wnids, classes)):
        for i in range(train_per_class):
            save_jpeg(classification_image(rng_for(seed, name, "train", c, i), shape, color),
                      root / "train" / wnid / f"{wnid}_{i}.JPEG")
    rows = ["ImageId,PredictionString"]
    for i in range(val_per_class * len(classes)):
        c = i % len(classes)
        stem = f"ILSVRC2012_val_{i + 1:08d}"
        shape, color = classes[c]
        save_jpeg(classification_image(rng_for(seed, name, "val", i), shape, color), root / "val" / f"{stem}.JPEG")
        rows.append(f"{stem},{wnids[c]} 0 0 95 95")
    (root / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    (root / "LOC_synset_mapping.txt").write_text(
        "".join(f"{w} {s} {c}\n" for w, (s, c) in zip(wnids, classes)))


def detection_image(rng: np.random.Generator, categories=COCO_CATEGORIES, tries: int = 20):
    """1-3 shapes that do not overlap: a shape partly hidden by a later one would keep its whole box, label noise
    that makes the demo's mAP depend on the seed. A shape that finds no free place in ``tries`` draws is left
    out."""
    h, w = (int(v) for v in rng.choice([(96, 128), (128, 96), (112, 112)]))
    img = Image.fromarray(noisy_background(rng, h, w))
    draw = ImageDraw.Draw(img)
    objects = []
    for _ in range(int(rng.integers(1, 4))):
        cat_id, shape, color = categories[int(rng.integers(len(categories)))]
        side = int(rng.integers(22, 48))
        for _ in range(tries):
            x0, y0 = int(rng.integers(0, w - side)), int(rng.integers(0, h - side))
            if all(x0 >= x + placed or x >= x0 + side or y0 >= y + placed or y >= y0 + side
                   for _, (x, y, placed, _) in objects):
                break
        else:
            continue
        draw_shape(draw, shape, (x0, y0, x0 + side, y0 + side), PALETTE[color])
        objects.append((cat_id, [float(x0), float(y0), float(side), float(side)]))
    return img, objects


def write_detection(root: Path, seed: int, size: WorldSize) -> None:
    """COCO layout: <split>2017/<id>.jpg and annotations/instances_<split>2017.json."""
    ann_id = 1
    for split, count, offset in (("train", size.det_train, 1), ("val", size.det_val, 500_001)):
        images, annotations = [], []
        for i in range(count):
            image_id = offset + i
            img, objects = detection_image(rng_for(seed, "coco", split, i))
            file_name = f"{image_id:012d}.jpg"
            save_jpeg(img, root / f"{split}2017" / file_name)
            images.append({"id": image_id, "file_name": file_name, "width": img.width, "height": img.height})
            for cat_id, bbox in objects:
                annotations.append({"id": ann_id, "image_id": image_id, "category_id": cat_id, "bbox": bbox,
                                    "area": bbox[2] * bbox[3], "iscrowd": 0})
                ann_id += 1
        categories = [{"id": cid, "name": f"{color}_{shape}", "supercategory": "shape"}
                      for cid, shape, color in COCO_CATEGORIES]
        out = root / "annotations" / f"instances_{split}2017.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))


def scene(rng: np.random.Generator, classes, style: str, h: int = 96, w: int = 128):
    """A scene image and its label map (values 1..len(classes), 0 = unlabeled seams)."""
    mask = np.zeros((h, w), dtype=np.uint8)
    horizon = int(rng.integers(h // 4, h // 2))
    mask[:horizon] = 1
    if style == "ade":
        split = int(rng.integers(w // 4, 3 * w // 4))
        mask[horizon:, :split] = 2
        mask[horizon:, split:] = 3
        for _ in range(int(rng.integers(1, 3))):
            bw, bh = int(rng.integers(12, 30)), int(rng.integers(10, horizon))
            bx = int(rng.integers(0, w - bw))
            mask[horizon - bh:horizon, bx:bx + bw] = 4
    else:  # streets: asphalt below, lamps as bright discs in the sky
        mask[horizon:] = 2
        yy, xx = np.mgrid[:h, :w]
        for _ in range(int(rng.integers(1, 4))):
            cx, cy, r = int(rng.integers(8, w - 8)), int(rng.integers(6, max(7, horizon - 2))), int(rng.integers(4, 8))
            mask[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 3
    mask[horizon - 1:horizon + 1] = 0  # unlabeled seam, as in ADE20K's 0 label
    colors = np.array([(0, 0, 0)] + [c for _, c in classes], dtype=np.float64)
    img = colors[mask] + rng.normal(0, 14, size=(h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8), mask


def write_segmentation(root: Path, classes, style: str, seed: int, name: str, train: int, val: int) -> None:
    """ADE20K layout: images/{training,validation}/ADE_<split>_<i>.jpg + annotations/.../ADE_<split>_<i>.png."""
    for split, tag, count in (("training", "train", train), ("validation", "val", val)):
        for i in range(count):
            img, mask = scene(rng_for(seed, name, split, i), classes, style)
            stem = f"ADE_{tag}_{i + 1:08d}"
            save_jpeg(img, root / "images" / split / f"{stem}.jpg")
            out = root / "annotations" / split / f"{stem}.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask).save(out, format="PNG")
    (root / "objectInfo150.csv").write_text(
        "Idx,Name\n" + "".join(f"{i + 1},{n}\n" for i, (n, _) in enumerate(classes)))


def write_oxford_pets(root: Path, classes, seed: int, train_per_class: int, test_per_class: int) -> None:
    """Oxford-IIIT Pet layout: images/<Breed>_<n>.jpg and annotations/{trainval,test}.txt ('<image> <class 1..C>
    <species 1 cat, 2 dog> <breed id>'). As in the distribution, cat breeds are capitalised, dog breeds not."""
    names = [f"{color}_{shape}".capitalize() if c % 2 == 0 else f"{color}_{shape}"
             for c, (shape, color) in enumerate(classes)]
    n = 0
    for split, per_class in (("trainval", train_per_class), ("test", test_per_class)):
        lines = []
        for c, (name, (shape, color)) in enumerate(zip(names, classes)):
            for i in range(per_class):
                n += 1
                save_jpeg(classification_image(rng_for(seed, "pets", split, c, i), shape, color),
                          root / "images" / f"{name}_{n}.jpg")
                lines.append(f"{name}_{n} {c + 1} {1 + c % 2} {c // 2 + 1}")
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"{split}.txt").write_text("\n".join(lines) + "\n")


# Cityscapes label ids for the streets scene's values (0 seam, 1 sky, 2 road, 3 lamp): unlabeled, sky, road,
# traffic light; the converter maps them to train ids 255, 10, 0, 6
CITYSCAPES_IDS = np.array([0, 23, 7, 19], dtype=np.uint8)


def write_cityscapes(root: Path, seed: int, train: int, val: int) -> None:
    """Cityscapes layout: leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png and
    gtFine/<split>/<city>/..._gtFine_labelIds.png (label ids, not train ids)."""
    for split, count, cities in (("train", train, ("aachen", "bochum")), ("val", val, ("frankfurt",))):
        for i in range(count):
            img, mask = scene(rng_for(seed, "streets", split, i), STREETS_CLASSES, "streets")
            city = cities[i % len(cities)]
            stem = f"{city}_{i:06d}_000019"
            for folder, suffix, array in (("leftImg8bit", "leftImg8bit", img),
                                          ("gtFine", "gtFine_labelIds", CITYSCAPES_IDS[mask])):
                path = root / folder / split / city / f"{stem}_{suffix}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(array).save(path, format="PNG")


VOC_OBJECTS = [("aeroplane", "star", "yellow"), ("car", "cross", "white"), ("person", "ring", "magenta")]
VOC_DIFFICULT_SIDE = 26  # boxes smaller than this are flagged difficult, as VOC flags hard-to-see objects


def write_voc(root: Path, seed: int, trainval: int, test: int) -> None:
    """PASCAL VOC 2007 layout under ``root/VOCdevkit/VOC2007``: JPEGImages/<id>.jpg, Annotations/<id>.xml (boxes
    as 1-based inclusive pixel indices, ``difficult`` flags) and ImageSets/Main/{trainval,test}.txt."""
    voc = root / "VOCdevkit" / "VOC2007"
    (voc / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    (voc / "Annotations").mkdir(parents=True, exist_ok=True)
    categories = [(i, shape, color) for i, (_, shape, color) in enumerate(VOC_OBJECTS)]
    number = 0
    for split, count in (("trainval", trainval), ("test", test)):
        ids = []
        for i in range(count):
            number += 1
            image_id = f"{number:06d}"
            img, objects = detection_image(rng_for(seed, "voc", split, i), categories)
            save_jpeg(img, voc / "JPEGImages" / f"{image_id}.jpg")
            body = ""
            for c, (x, y, w, h) in objects:
                body += (f"<object><name>{VOC_OBJECTS[c][0]}</name><pose>Unspecified</pose><truncated>0</truncated>"
                         f"<difficult>{int(w < VOC_DIFFICULT_SIDE)}</difficult><bndbox><xmin>{int(x) + 1}</xmin>"
                         f"<ymin>{int(y) + 1}</ymin><xmax>{int(x + w)}</xmax><ymax>{int(y + h)}</ymax></bndbox>"
                         "</object>")
            (voc / "Annotations" / f"{image_id}.xml").write_text(
                f"<annotation><folder>VOC2007</folder><filename>{image_id}.jpg</filename><size><width>{img.width}"
                f"</width><height>{img.height}</height><depth>3</depth></size><segmented>0</segmented>{body}"
                "</annotation>\n")
            ids.append(image_id)
        (voc / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")


def write_world(out: Path, seed: int = 0, scale: float = 1.0) -> dict[str, Path]:
    """Write the whole synthetic world under ``out``; returns each dataset's root."""
    size = WorldSize().scaled(scale)
    roots = {"imagenet": out / "imagenet", "coco": out / "coco", "ade20k": out / "ADEChallengeData2016",
             "pets": out / "pets" / "oxford-iiit-pet", "streets": out / "streets" / "cityscapes", "voc": out / "voc"}
    write_classification(roots["imagenet"], IMAGENET_CLASSES, seed, "imagenet", size.cls_train_per_class,
                         size.cls_val_per_class)
    write_detection(roots["coco"], seed, size)
    write_segmentation(roots["ade20k"], ADE_CLASSES, "ade", seed, "ade20k", size.seg_train, size.seg_val)
    write_oxford_pets(roots["pets"], PETS_CLASSES, seed, size.cls_train_per_class, size.cls_val_per_class)
    write_cityscapes(roots["streets"], seed, size.seg_train // 2, size.seg_val)
    write_voc(roots["voc"], seed, size.voc_trainval, size.voc_test)
    return roots


# ------------------------------------------------------------------------------------------- real-size world

# COCO's 80 category ids (1..90 with gaps), as in instances_*.json
COCO_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]


def jittered(rng: np.random.Generator, width: int, height: int, spread: float = 0.15) -> tuple[int, int]:
    scale = 1 + rng.uniform(-spread, spread)
    return max(32, round(width * scale)), max(32, round(height * scale))


def real_classification(root: Path, seed: int, train: int, val: int) -> None:
    """ILSVRC layout with ImageNet's 1000-class list; ``train`` images over a few class folders, ~500 x 375."""
    wnids = [f"n{10000000 + i:08d}" for i in range(1000)]
    (root / "LOC_synset_mapping.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "LOC_synset_mapping.txt").write_text("".join(f"{w} class {i}\n" for i, w in enumerate(wnids)))

    def image(rng):
        w, h = jittered(rng, 500, 375)
        img = Image.fromarray(noisy_background(rng, h, w))
        r = int(rng.integers(min(w, h) // 6, min(w, h) // 3))
        cx, cy = int(rng.integers(r, w - r)), int(rng.integers(r, h - r))
        draw_shape(ImageDraw.Draw(img), SHAPES[int(rng.integers(len(SHAPES)))], (cx - r, cy - r, cx + r, cy + r),
                   tuple(int(v) for v in rng.integers(0, 256, 3)))
        return img

    for i in range(train):
        wnid = wnids[(i * 37) % 1000]
        save_jpeg(image(rng_for(seed, "real-imagenet", "train", i)), root / "train" / wnid / f"{wnid}_{i}.JPEG")
    rows = ["ImageId,PredictionString"]
    for i in range(val):
        stem = f"ILSVRC2012_val_{i + 1:08d}"
        save_jpeg(image(rng_for(seed, "real-imagenet", "val", i)), root / "val" / f"{stem}.JPEG")
        rows.append(f"{stem},{wnids[(i * 53) % 1000]} 0 0 10 10")
    (root / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")


def real_detection(root: Path, seed: int, train: int, val: int) -> None:
    """COCO layout with its 80 category ids; ~640 x 480 images, a third portrait; 0-20 boxes each (every fifth
    image none), crowd boxes and tiny (2-8 px) boxes among them."""
    ann_id = 1
    categories = [{"id": cid, "name": f"category_{cid}", "supercategory": "thing"} for cid in COCO_IDS]
    for split, count, offset in (("train", train, 1), ("val", val, 900_001)):
        images, annotations = [], []
        for i in range(count):
            rng = rng_for(seed, "real-coco", split, i)
            w, h = jittered(rng, 640, 480, 0.1)
            if i % 3 == 1:
                w, h = h, w
            img = Image.fromarray(noisy_background(rng, h, w))
            draw = ImageDraw.Draw(img)
            n_boxes = 0 if i % 5 == 4 else int(rng.integers(1, 21))
            for b in range(n_boxes):
                tiny = b % 4 == 3
                bw, bh = (int(rng.integers(2, 9)), int(rng.integers(2, 9))) if tiny else \
                    (int(rng.integers(16, w // 2)), int(rng.integers(16, h // 2)))
                x0, y0 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
                draw.rectangle((x0, y0, x0 + bw, y0 + bh), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
                annotations.append({"id": ann_id, "image_id": offset + i,
                                    "bbox": [float(x0), float(y0), float(bw), float(bh)],
                                    "category_id": COCO_IDS[int(rng.integers(len(COCO_IDS)))], "area": float(bw * bh),
                                    "iscrowd": int(b % 7 == 6)})
                ann_id += 1
            file_name = f"{offset + i:012d}.jpg"
            save_jpeg(img, root / f"{split}2017" / file_name)
            images.append({"id": offset + i, "file_name": file_name, "width": w, "height": h})
        out = root / "annotations" / f"instances_{split}2017.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))


def real_segmentation(root: Path, seed: int, train: int, val: int) -> None:
    """ADE20K layout with 150 classes (``objectInfo150.csv``); ~683 x 512 scenes of rectangles of any of the
    150 labels, and 0 (unlabeled) around them."""
    (root / "objectInfo150.csv").parent.mkdir(parents=True, exist_ok=True)
    (root / "objectInfo150.csv").write_text("Idx,Name\n" + "".join(f"{i},class_{i}\n" for i in range(1, 151)))
    for split, tag, count in (("training", "train", train), ("validation", "val", val)):
        for i in range(count):
            rng = rng_for(seed, "real-ade", split, i)
            w, h = jittered(rng, 683, 512, 0.1)
            mask = np.zeros((h, w), dtype=np.uint8)
            for _ in range(int(rng.integers(5, 25))):
                x0, y0 = int(rng.integers(0, w - 16)), int(rng.integers(0, h - 16))
                mask[y0:y0 + int(rng.integers(16, h // 2)), x0:x0 + \
                                 int(rng.integers(16, w // 2))] = rng.integers(1, 151)
            colors = rng_for(seed, "real-ade-colours").integers(0, 256, size=(151, 3)).astype(np.float64)
            img = np.clip(colors[mask] + rng.normal(0, 12, size=(h, w, 3)), 0, 255).astype(np.uint8)
            stem = f"ADE_{tag}_{i + 1:08d}"
            save_jpeg(img, root / "images" / split / f"{stem}.jpg")
            (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask).save(root / "annotations" / split / f"{stem}.png", format="PNG")


def write_real_size_world(out: Path, seed: int = 0, train: int = 4, val: int = 2) -> dict[str, Path]:
    """ImageNet, COCO and ADE20K at their real resolutions and label spaces, ``train`` / ``val`` images each:
    what the rehearsal feeds the paper's recipes. Returns each dataset's root, as :func:`write_world`."""
    roots = {"imagenet": out / "imagenet", "coco": out / "coco", "ade20k": out / "ADEChallengeData2016"}
    real_classification(roots["imagenet"], seed, train, val)
    real_detection(roots["coco"], seed, train, val)
    real_segmentation(roots["ade20k"], seed, train, val)
    return roots


def write_real_size_shards(out: Path, ranks: int) -> Path:
    """``write_real_size_world`` in ``out/world`` for ``ranks`` ranks and its shards in ``out/shards``, one sample per
    shard, so every rank's reader gets two training shards (``mthl-ds rehearse``, ``bench data --real-size``)."""
    from mthl_ds.data.convert import convert
    shards = out / "shards"
    if (shards / ".complete").is_file():
        return shards
    roots = write_real_size_world(out / "world", train=2 * ranks, val=ranks)
    for split in ("train", "val"):
        common = dict(split=split, shard_size=1, force=True)
        convert("imagenet", shards / "imagenet" / split, root=roots["imagenet"], **common)
        convert("coco", shards / "coco" / split, images=roots["coco"] / f"{split}2017",
                annotations=roots["coco"] / "annotations" / f"instances_{split}2017.json", **common)
        convert("ade20k", shards / "ade20k" / split, root=roots["ade20k"], **common)
    (shards / ".complete").write_text("ok\n")
    return shards

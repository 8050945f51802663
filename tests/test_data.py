"""Synthetic world -> converters -> shards -> pipelines: round trips, determinism, splits and bad data."""
import hashlib
import io
import json
import logging
import math
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mthl_ds.data.convert import convert, convert_world
from mthl_ds.data.images import resize_bilinear
from mthl_ds.data.pipelines import IGNORE_INDEX, DatasetLoader, PipelineConfig, eval_loader, make_decoder
from mthl_ds.data.reader import ShardSet, TrainStream, read_shard
from mthl_ds.data.sampler import TwoStepSampler
from mthl_ds.data.shards import ShardError
from mthl_ds.geometry import MEAN, STD
from mthl_ds.studies.synth import write_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    roots = write_world(root / "raw", seed=3, scale=0.25)
    sets = convert_world(roots, root / "shards", shard_size=8, progress=lambda _: None)
    return roots, sets


def all_samples(shard_dir: Path):
    s = ShardSet.open(shard_dir)
    return [sample for shard in s.shards for sample in read_shard(s.root / shard["name"])[0]]


def test_imagenet_round_trip_keeps_bytes_and_labels(world):
    roots, sets = world
    samples = dict(all_samples(sets["imagenet"] / "train"))
    index = json.loads((sets["imagenet"] / "train" / "index.json").read_text())
    files = sorted((roots["imagenet"] / "train").glob("*/*.JPEG"))
    assert len(samples) == len(files) == index["num_samples"]
    for f in files:
        members = samples[f.stem]
        assert members["jpg"] == f.read_bytes(), "image bytes must be stored unchanged"
        assert index["classes"][int(members["cls"])] == f.parent.name
    # the flat val layout with its label file
    rows = (roots["imagenet"] / "LOC_val_solution.csv").read_text().splitlines()[1:]
    truth = {r.split(",")[0]: r.split(",")[1].split()[0] for r in rows}
    val = dict(all_samples(sets["imagenet"] / "val"))
    assert {k: index["classes"][int(m["cls"])] for k, m in val.items()} == truth


def test_coco_round_trip_keeps_boxes_categories_and_ids(world):
    roots, sets = world
    source = json.loads((roots["coco"] / "annotations" / "instances_val2017.json").read_text())
    samples = dict(all_samples(sets["coco"] / "val"))
    assert len(samples) == len(source["images"])
    decode = make_decoder(PipelineConfig("detection", (128, 128)), train=False)
    for img in source["images"]:
        anns = sorted((a for a in source["annotations"] if a["image_id"] == img["id"]), key=lambda a: a["id"])
        members = samples[Path(img["file_name"]).stem]
        meta = json.loads(members["json"])
        assert meta["image_id"] == img["id"] and (meta["width"], meta["height"]) == (img["width"], img["height"])
        assert meta["boxes"] == [a["bbox"] for a in anns]
        assert meta["category_ids"] == [a["category_id"] for a in anns]
        assert meta["ann_ids"] == [a["id"] for a in anns] and meta["iscrowd"] == [0] * len(anns)
        item = decode({"__key__": "k", **members}, None)
        expected = torch.tensor([a["bbox"] for a in anns]).reshape(-1, 4)
        expected[:, 2:] += expected[:, :2]
        torch.testing.assert_close(item["boxes"] / item["scale"], expected, rtol=0, atol=1e-4)
        assert item["image"].shape == (3, 128, 128)


def test_synthetic_coco_objects_are_whole_and_do_not_overlap(world):
    """Every annotated shape is fully visible (issue 18: overlapping shapes were label noise), and every image
    has one, so none is left out of training by filter_empty_gt."""
    roots, _ = world
    for split in ("train", "val"):
        source = json.loads((roots["coco"] / "annotations" / f"instances_{split}2017.json").read_text())
        boxes = {img["id"]: [] for img in source["images"]}
        for a in source["annotations"]:
            boxes[a["image_id"]].append(a["bbox"])
        for image_id, image_boxes in boxes.items():
            assert 1 <= len(image_boxes) <= 3, (split, image_id)
            for i, (x, y, w, h) in enumerate(image_boxes):
                for u, v, p, q in image_boxes[i + 1:]:
                    assert x >= u + p or u >= x + w or y >= v + q or v >= y + h, (split, image_id, image_boxes)


def test_ade20k_round_trip_keeps_mask_pixels(world):
    roots, sets = world
    samples = dict(all_samples(sets["ade20k"] / "val"))
    files = sorted((roots["ade20k"] / "annotations" / "validation").glob("*.png"))
    assert len(samples) == len(files)
    for f in files:
        members = samples[f.stem]
        assert members["png"] == f.read_bytes()
        source = np.asarray(Image.open(f))
        h, w = source.shape
        item = make_decoder(PipelineConfig("segmentation", (h, w)), train=False)({"__key__": f.stem, **members}, None)
        expected = torch.from_numpy(source.astype(np.int64) - 1)
        expected[torch.from_numpy(source == 0)] = IGNORE_INDEX
        assert torch.equal(item["mask"], expected), "class ids must survive mask decoding"
        assert set(np.unique(source)) <= {0, 1, 2, 3, 4}


def test_conversion_is_byte_identical_for_any_worker_count(world, tmp_path):
    roots, _ = world
    a = convert("imagenet", tmp_path / "a", split="train", root=roots["imagenet"], shard_size=7, workers=1)
    b = convert("imagenet", tmp_path / "b", split="train", root=roots["imagenet"], shard_size=7, workers=2)
    assert a == b
    for shard in a["shards"]:
        digest = hashlib.sha256((tmp_path / "b" / shard["name"]).read_bytes()).hexdigest()
        assert (tmp_path / "a" / shard["name"]).read_bytes() == (tmp_path / "b" / shard["name"]).read_bytes()
        assert digest == shard["sha256"]
    assert (tmp_path / "a" / "index.json").read_bytes() == (tmp_path / "b" / "index.json").read_bytes()


def test_existing_shard_set_is_not_overwritten_without_force(world, tmp_path):
    roots, _ = world
    convert("imagenet", tmp_path / "s", split="val", root=roots["imagenet"], shard_size=8)
    before = (tmp_path / "s" / "index.json").read_bytes()
    with pytest.raises(ShardError, match="already holds files; pass --force"):
        convert("imagenet", tmp_path / "s", split="val", root=roots["imagenet"], shard_size=4)
    assert (tmp_path / "s" / "index.json").read_bytes() == before
    convert("imagenet", tmp_path / "s", split="val", root=roots["imagenet"], shard_size=4, force=True)
    assert len(ShardSet.open(tmp_path / "s").shards) > len(json.loads(before)["shards"])


def test_sampler_matches_weights_and_resumes():
    sampler = TwoStepSampler({"imagenet": 3, "coco": 2, "ade20k": 1}, seed=11)
    counts = sampler.counts(0, 6000)
    observed = [counts[n] for n in sampler.names]
    chi2 = sum((o - 6000 * p) ** 2 / (6000 * p) for o, p in zip(observed, sampler.probs))
    assert math.exp(-chi2 / 2) > 0.01, (observed, chi2)  # chi-square survival function for 2 degrees of freedom
    other_rank = TwoStepSampler({"imagenet": 3, "coco": 2, "ade20k": 1}, seed=11)
    sequence = [sampler.dataset_at(t) for t in range(500)]
    assert sequence == [other_rank.dataset_at(t) for t in range(500)]
    resumed = TwoStepSampler({"imagenet": 3, "coco": 2, "ade20k": 1}, seed=11)
    assert [resumed.dataset_at(t) for t in range(200, 500)] == sequence[200:]
    assert sequence != [TwoStepSampler({"imagenet": 3, "coco": 2, "ade20k": 1}, seed=12).dataset_at(t)
                        for t in range(500)]
    mix = sampler.realised_mix(counts)
    assert abs(mix["imagenet"]["share"] - 0.5) < 0.03 and mix["ade20k"]["target"] == pytest.approx(1 / 6)
    cycled = TwoStepSampler({"imagenet": 3, "coco": 2, "ade20k": 1}, seed=11, cycle=("coco", "ade20k"))
    assert [cycled.dataset_at(t) for t in range(5)] == ["coco", "ade20k", "coco", "ade20k", "coco"]


def epoch0_keys(shard_set, rank, world, workers):
    """Keys each (rank, worker) reader yields in epoch 0, read through the real DataLoader."""
    order = np.random.default_rng([0, 0]).permutation(len(shard_set.shards))
    quota = {w: sum(shard_set.shards[i]["num_samples"] for i in order[rank * workers + w::world * workers])
             for w in range(workers)}
    decode = make_decoder(PipelineConfig("classification", (32, 32)), train=True)
    loader = DatasetLoader(shard_set, decode, batch_size=1, rank=rank, world=world, seed=0, workers=workers)
    keys = {w: [] for w in range(workers)}
    while any(len(keys[w]) < quota[w] for w in keys):
        batch = next(loader)
        w = int(batch["__worker__"][0])
        if len(keys[w]) < quota[w]:
            keys[w].append(batch["__key__"][0])
    return keys


def test_two_ranks_two_workers_read_disjoint_samples(world):
    shard_set = ShardSet.open(world[1]["imagenet"] / "train")
    seen = []
    for rank in (0, 1):
        for keys in epoch0_keys(shard_set, rank, 2, 2).values():
            seen.extend(keys)
    assert len(seen) == len(set(seen)) == len(shard_set)


def test_eval_covers_every_val_sample_exactly_once(world):
    shard_set = ShardSet.open(world[1]["coco"] / "val")
    decode = make_decoder(PipelineConfig("detection", (64, 64)), train=False)
    per_rank = []
    for rank in (0, 1):
        batches = list(eval_loader(shard_set, decode, batch_size=4, rank=rank, world=2, workers=2))
        assert all(b["image"].shape == (4, 3, 64, 64) for b in batches)
        per_rank.append(batches)
    assert len(per_rank[0]) == len(per_rank[1]), "ranks must run the same number of eval batches"
    valid = [k for batches in per_rank for b in batches for k, v in zip(b["__key__"], b["valid"]) if v]
    assert len(valid) == len(set(valid)) == len(shard_set)


def test_loader_is_deterministic_and_resumes_exactly(world):
    shard_set = ShardSet.open(world[1]["ade20k"] / "train")
    decode = make_decoder(PipelineConfig("segmentation", (48, 48)), train=True)
    make = lambda state=None: DatasetLoader(shard_set, decode, batch_size=3, rank=1, world=2, seed=5,  # noqa: E731
                                            workers=2, state=state)
    straight = make()
    full = [next(straight) for _ in range(9)]
    first = make()
    for _ in range(5):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON round trip (checkpoint client state)
    resumed = make(state)
    for expected in full[5:]:
        got = next(resumed)
        assert got["__key__"] == expected["__key__"]
        assert torch.equal(got["image"], expected["image"]) and torch.equal(got["mask"], expected["mask"])
    assert len({tuple(b["__key__"]) for b in full}) == len(full)
    assert (full[0]["mask"] != IGNORE_INDEX).any()


# ------------------------------------------------------------------------------------------- bad data

def jpeg_bytes(color=(200, 10, 10), size=(32, 32)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


def png_bytes(array):
    buf = io.BytesIO()
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_truncated_jpeg_is_skipped_and_counted(tmp_path, caplog):
    root = tmp_path / "inet"
    for i, wnid in enumerate(["n001", "n002"]):
        d = root / "train" / wnid
        d.mkdir(parents=True)
        for j in range(3):
            (d / f"{wnid}_{j}.JPEG").write_bytes(jpeg_bytes((40 * i, 90, 30 * j)))
    broken = root / "train" / "n002" / "n002_1.JPEG"
    broken.write_bytes(broken.read_bytes()[:200])
    with caplog.at_level(logging.WARNING):
        index = convert("imagenet", tmp_path / "out", split="train", root=root, shard_size=2)
    assert index["num_samples"] == 5 and index["skipped"] == 1
    assert "n002_1.JPEG" in caplog.text and "does not decode" in caplog.text


def ade_tree(root, masks):
    for split in ("training",):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i, mask in enumerate(masks):
            (root / "images" / split / f"ADE_{i}.jpg").write_bytes(jpeg_bytes(size=(8, 6)))
            (root / "annotations" / split / f"ADE_{i}.png").write_bytes(mask)


def test_bad_masks_are_skipped_and_named(tmp_path, caplog):
    good = png_bytes(np.full((6, 8), 2))
    out_of_range = png_bytes(np.full((6, 8), 200))
    ade_tree(tmp_path / "ade", [good, b"\x89PNG\r\n\x1a\nnot a png", out_of_range, good])
    with caplog.at_level(logging.WARNING):
        index = convert("ade20k", tmp_path / "out", split="training", root=tmp_path / "ade", shard_size=2)
    assert index["num_samples"] == 2 and index["skipped"] == 2
    assert "ADE_1.png: mask does not decode" in caplog.text
    assert "ADE_2.png: mask label 200 is neither a class (values 1-150 for num_classes=150, 0 unlabelled) nor " \
        "the ignore value 255" in caplog.text


def test_bad_boxes_are_dropped_and_counted(tmp_path, caplog):
    images = tmp_path / "img"
    images.mkdir()
    (images / "1.jpg").write_bytes(jpeg_bytes(size=(40, 30)))
    ann = {"images": [{"id": 1, "file_name": "1.jpg", "width": 40, "height": 30}],
           "categories": [{"id": 5, "name": "thing"}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 5, "bbox": [1, 1, 10, 10], "iscrowd": 0},
                           {"id": 2, "image_id": 1, "category_id": 5, "bbox": [3, 3, 0, 10], "iscrowd": 0},
                           {"id": 3, "image_id": 1, "category_id": 5, "bbox": [50, 5, 10, 10], "iscrowd": 0}]}
    (tmp_path / "instances.json").write_text(json.dumps(ann))
    with caplog.at_level(logging.WARNING):
        index = convert("coco", tmp_path / "out", split="x", images=images, annotations=tmp_path / "instances.json")
    assert index["dropped_boxes"] == 2
    assert "annotation 2 of image 1" in caplog.text and "annotation 3 of image 1" in caplog.text
    meta = json.loads(dict(all_samples(tmp_path / "out"))["000000000001"]["json"])
    assert meta["ann_ids"] == [1]


def write_tar(path, samples):
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def hand_shard_set(root, shards):
    root.mkdir(parents=True)
    entries = []
    for i, samples in enumerate(shards):
        write_tar(root / f"{i:06d}.tar", samples)
        entries.append({"name": f"{i:06d}.tar", "num_samples": len(samples), "sha256": ""})
    (root / "index.json").write_text(json.dumps({"task": "classification", "num_samples": sum(map(len, shards)),
                                                 "classes": ["a", "b"], "shards": entries}))
    return ShardSet.open(root)


def test_corrupt_member_and_undecodable_sample_are_skipped_without_stalling(tmp_path, caplog):
    good = lambda k: (k, {"jpg": jpeg_bytes(), "cls": b"1"})  # noqa: E731
    shard_set = hand_shard_set(tmp_path / "set", [[good("a0"), ("a1", {"jpg": b"garbage", "cls": b"0"}), good("a2")],
                                                  [good("b0"), good("b1"), good("b2")]])
    path = shard_set.root / "000001.tar"
    with tarfile.open(path) as tar:
        offset = next(m.offset for m in tar.getmembers() if m.name == "b1.jpg")
    data = path.read_bytes()
    path.write_bytes(data[:offset] + b"\xff" * 512 + data[offset + 512:])  # damage b1's header
    decode = make_decoder(PipelineConfig("classification", (16, 16)), train=False)
    stream = iter(TrainStream(shard_set, lambda s, rng: decode(s, rng), seed=0))
    start = time.time()
    with caplog.at_level(logging.WARNING):
        keys = [next(stream)["__key__"] for _ in range(6)]
    assert time.time() - start < 5, "bad samples must not be slept on"
    assert set(keys) == {"a0", "a2", "b0"}, "the stream goes on past bad samples and a damaged shard"
    assert "000000.tar: sample a1 skipped" in caplog.text
    assert "000001.tar: damaged tar, read 1 of 3 samples (stopped after key b0)" in caplog.text


def test_empty_and_too_small_shard_sets_are_refused(tmp_path, world):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardError, match="empty.*no index.json"):
        ShardSet.open(tmp_path / "empty")
    (tmp_path / "empty" / "index.json").write_text(json.dumps({"shards": [], "num_samples": 0}))
    with pytest.raises(ShardError, match="the shard set is empty"):
        ShardSet.open(tmp_path / "empty")
    shard_set = ShardSet.open(world[1]["pets"] / "val")
    with pytest.raises(ShardError, match=r"\d+ shards for 4 ranks x 2 workers = 8 readers"):
        DatasetLoader(shard_set, make_decoder(PipelineConfig("classification", (16, 16)), True), 2, world=4,
                      workers=2)
    with pytest.raises(ShardError, match="no samples found"):
        (tmp_path / "inet" / "train" / "n1").mkdir(parents=True)
        convert("imagenet", tmp_path / "o", split="train", root=tmp_path / "inet")


def test_data_benchmark_smoke():
    from mthl_ds.studies.bench.data import run
    rows = run(count=40, repeats=1)
    assert [r["benchmark"].split()[0] for r in rows] == ["B5", "detection", "segmentation"]
    assert all(r["images_per_s"] > 0 for r in rows) and rows[0]["throughput_ratio"] > 0


def test_real_size_data_benchmark_gives_workers_per_gpu():
    from mthl_ds.studies.bench.data import run_real_size
    rows = {r["task"]: r for r in run_real_size("mthl_swin_t", count=6, repeats=1)}
    assert set(rows) == {"classification", "detection", "segmentation"}
    for r in rows.values():
        assert r["images_per_s_per_worker"] > 0 and r["source"]
        assert r["workers_per_gpu"] == math.ceil(r["images_per_s_needed"] / r["images_per_s_per_worker"]) >= 1
    assert rows["classification"]["images_per_s_needed"] == pytest.approx(
        64 / rows["classification"]["v100_step_s"], rel=1e-2)


def test_a_window_of_the_bilinear_resize_equals_that_part_of_the_whole_one():
    """The segmentation training crop is resized alone (``resize_bilinear(..., window=...)``): bit for bit the
    crop of the whole resized image, windows reaching past its edge included, shrinking and enlarging."""
    rng = np.random.default_rng(0)
    for _ in range(100):
        (h, w), (new_h, new_w) = rng.integers(2, 120, 2).tolist(), rng.integers(1, 240, 2).tolist()
        img = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
        top, left = int(rng.integers(0, new_h)), int(rng.integers(0, new_w))
        crop_h, crop_w = rng.integers(1, 80, 2).tolist()
        whole = resize_bilinear(img, new_h, new_w)[top:top + crop_h, left:left + crop_w]
        assert np.array_equal(resize_bilinear(img, new_h, new_w, window=(top, left, crop_h, crop_w)), whole)


def test_segmentation_training_redraws_one_class_crops_and_distorts_colours_as_mmseg():
    """The segmentation training decoder crops as mmseg's ``RandomCrop(cat_max_ratio=0.75)`` (a crop one class
    covers 75% of is drawn again: on a map 90% one class, most 32 x 32 crops hold two classes, where one drawn
    once would mostly not) and distorts colours as ``PhotoMetricDistortion`` (most images leave the flat grey
    they were), the mask still aligned with the image (the one class-2 patch stays where its pixels are)."""
    height, width = 96, 128
    mask = np.full((height, width), 1, np.uint8)  # stored k + 1 (ADE20K): class 0 almost everywhere
    mask[40:70, 90:120] = 2
    image = np.full((height, width, 3), 128, np.uint8)
    image[40:70, 90:120] = (250, 20, 20)
    buffers = [io.BytesIO(), io.BytesIO()]
    Image.fromarray(image).save(buffers[0], format="PNG")
    Image.fromarray(mask).save(buffers[1], format="PNG")
    sample = {"img.png": buffers[0].getvalue(), "png": buffers[1].getvalue(), "json": b"{}"}
    decode = make_decoder(PipelineConfig("segmentation", (32, 32), scale_range=(3.0, 3.0)), train=True)
    undistorted = (128 / 255 - torch.tensor(MEAN)) / torch.tensor(STD)
    rng = np.random.default_rng(0)
    two_classes = distorted = 0
    for _ in range(40):
        item = decode(sample, rng)
        classes = set(item["mask"].unique().tolist()) - {IGNORE_INDEX}
        two_classes += classes == {0, 1}
        grey = item["image"][:, item["mask"] == 0]  # normalised: 128 / 255 per channel if undistorted
        distorted += bool((grey.mean(dim=1) - undistorted).abs().max() > 0.1 or grey.std(dim=1).max() > 0.05)
        if classes == {0, 1}:  # the patch's pixels are the red ones
            red = item["image"][0] - item["image"][1]
            assert red[item["mask"] == 1].mean() > red[item["mask"] == 0].mean() + 0.25
    assert two_classes >= 30 and distorted >= 20

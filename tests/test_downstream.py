"""The downstream converters on their layouts as distributed (written here, quirks included), ignore labels in
segmentation, the VOC metric against hand-computed values, and an adaptation run on each kind of set."""
import io
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from test_data import all_samples

from mthl_ds.analysis.metrics import SegmentationEvaluator, voc_ap, voc_map
from mthl_ds.data.convert import convert
from mthl_ds.data.pipelines import IGNORE_INDEX, PipelineConfig, make_decoder
from mthl_ds.data.shards import ShardError
from mthl_ds.studies.synth import PETS_CLASSES, classification_image, write_cityscapes, write_oxford_pets, write_voc


def samples_of(folder):
    return dict(all_samples(folder))


def rng(*key):
    return np.random.default_rng([7, *key])


def same_output_for_any_worker_count(tmp_path, kind, **kw):
    a = convert(kind, tmp_path / "w1", shard_size=2, workers=1, **kw)
    b = convert(kind, tmp_path / "w2", shard_size=2, workers=2, **kw)
    assert a == b
    for shard in a["shards"]:
        assert (tmp_path / "w1" / shard["name"]).read_bytes() == (tmp_path / "w2" / shard["name"]).read_bytes()
    return a


# ------------------------------------------------------------------------------------------- classification

def test_pets_layout_through_torchvision(tmp_path, caplog):
    root = tmp_path / "oxford-iiit-pet"
    write_oxford_pets(root, PETS_CLASSES[:3], seed=0, train_per_class=2, test_per_class=2)
    (root / "images" / "Magenta_bar_6.jpg").unlink()  # listed in trainval.txt, not on disk
    with caplog.at_level(logging.WARNING):
        index = same_output_for_any_worker_count(tmp_path, "pets", root=root, split="trainval")
    assert "Magenta_bar_6.jpg is missing" in caplog.text and index["missing_samples"] == 1
    assert index["classes"] == ["Orange Star", "Cyan Diamond", "Magenta Bar"]  # as torchvision names the breeds
    samples = samples_of(tmp_path / "w1")
    assert sorted(samples) == ["Magenta_bar_5", "Orange_star_1", "Orange_star_2", "cyan_diamond_3",
                               "cyan_diamond_4"]
    assert samples["Magenta_bar_5"]["cls"] == b"2" and samples["cyan_diamond_3"]["cls"] == b"1"
    assert convert("pets", tmp_path / "test", root=root, split="test")["num_samples"] == 6


def write_cub(root):
    """CUB_200_2011: images/<class dir>/<file>, images.txt, image_class_labels.txt, train_test_split.txt,
    classes.txt, each '<id> <value>', ids from 1."""
    classes = ["001.Black_footed_Albatross", "002.Laysan_Albatross"]
    images, labels, split = [], [], []
    for i in range(1, 7):
        c = (i - 1) % 2
        rel = f"{classes[c]}/{classes[c][4:]}_{i:04d}.jpg"
        (root / "images" / classes[c]).mkdir(parents=True, exist_ok=True)
        classification_image(rng(100 + i), "square", "blue").save(root / "images" / rel)
        images.append(f"{i} {rel}")
        labels.append(f"{i} {c + 1}")
        split.append(f"{i} {1 if i <= 4 else 0}")
    for name, lines in (("images.txt", images), ("image_class_labels.txt", labels),
                        ("train_test_split.txt", split),
                        ("classes.txt", [f"{i + 1} {c}" for i, c in enumerate(classes)])):
        (root / name).write_text("\n".join(lines) + "\n")


def test_cub_split_file_and_labels(tmp_path):
    root = tmp_path / "CUB_200_2011"
    write_cub(root)
    index = same_output_for_any_worker_count(tmp_path, "cub", root=root, split="train")
    assert index["num_samples"] == 4 and index["classes"] == ["001.Black_footed_Albatross", "002.Laysan_Albatross"]
    samples = samples_of(tmp_path / "w1")
    assert {k: v["cls"] for k, v in samples.items()} == {"000000000001": b"0", "000000000002": b"1",
                                                          "000000000003": b"0", "000000000004": b"1"}  # ids
    assert convert("cub", tmp_path / "test", root=root, split="test")["num_samples"] == 2
    (root / "image_class_labels.txt").write_text((root / "image_class_labels.txt").read_text().replace("6 2", "6 9"))
    with pytest.raises(ShardError, match="image 6 has class 9, not in classes.txt"):
        convert("cub", tmp_path / "bad", root=root, split="test")
    assert not (tmp_path / "bad").exists()


def test_imagefolder_with_any_class_names(tmp_path):
    for c, name in enumerate(["tabby cat", "Ärger", "z-last"]):
        for i in range(2):
            (tmp_path / "data" / name).mkdir(parents=True, exist_ok=True)
            classification_image(rng(200 + c, i), "disc", "green").save(tmp_path / "data" / name / f"img.{i}.png")
    (tmp_path / "data" / "tabby cat" / "notes.txt").write_text("not an image")
    index = same_output_for_any_worker_count(tmp_path, "imagefolder", root=tmp_path / "data", split="train")
    assert index["classes"] == ["tabby cat", "z-last", "Ärger"] and index["num_samples"] == 6
    assert samples_of(tmp_path / "w1")["Ärger_img_1"]["cls"] == b"2"


def test_stanford_cars_devkit_through_torchvision(tmp_path):
    from scipy.io import savemat
    root = tmp_path / "stanford_cars"
    (root / "devkit").mkdir(parents=True)
    names = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Audi R8 Coupe 2012"]
    savemat(root / "devkit" / "cars_meta.mat", {"class_names": np.array(names, dtype=object)})
    fields = [("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"), ("bbox_y2", "O"), ("class", "O"), ("fname", "O")]
    for split, count, mat in (("train", 5, root / "devkit" / "cars_train_annos.mat"),
                              ("test", 3, root / "cars_test_annos_withlabels.mat")):
        (root / f"cars_{split}").mkdir()
        rows = []
        for i in range(count):
            fname = f"{i + 1:05d}.jpg"
            classification_image(rng(500 + i), "square", "red").save(root / f"cars_{split}" / fname)
            rows.append((1, 1, 90, 90, (i % 3) + 1, fname))  # the devkit's classes count from 1
        savemat(mat, {"annotations": np.array(rows, dtype=fields).reshape(1, -1)})
    index = same_output_for_any_worker_count(tmp_path, "cars", root=root, split="train")
    assert index["classes"] == names and index["num_samples"] == 5
    assert {k: v["cls"] for k, v in samples_of(tmp_path / "w1").items()} == {
        "00001": b"0", "00002": b"1", "00003": b"2", "00004": b"0", "00005": b"1"}
    assert convert("cars", tmp_path / "test", root=root, split="test")["num_samples"] == 3


def test_places365_lists(tmp_path):
    root = tmp_path / "places365"
    root.mkdir()
    (root / "categories_places365.txt").write_text("/a/airfield 0\n/b/bakery/shop 1\n/c/canyon 2\n")
    train = ["/a/airfield/00000001.jpg 0", "/b/bakery/shop/00000001.jpg 1", "/c/canyon/00000001.jpg 2",
             "/c/canyon/00000002.jpg 2"]
    for line in train:
        path = root / "data_large_standard" / line.split()[0].lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        classification_image(rng(len(str(path))), "disc", "blue").save(path)
    (root / "places365_train_standard.txt").write_text("\n".join(train) + "\n")
    (root / "val_large").mkdir()
    classification_image(rng(9), "disc", "blue").save(root / "val_large" / "Places365_val_00000001.jpg")
    (root / "places365_val.txt").write_text("Places365_val_00000001.jpg 1\nPlaces365_val_00000002.jpg 2\n")
    index = same_output_for_any_worker_count(tmp_path, "places365", root=root, split="train")
    assert index["classes"] == ["/a/airfield", "/b/bakery/shop", "/c/canyon"] and index["num_samples"] == 4
    assert samples_of(tmp_path / "w1")["b_bakery_shop_00000001"]["cls"] == b"1"
    val = convert("places365", tmp_path / "val", root=root, split="val")
    assert val["num_samples"] == 1 and val["missing_samples"] == 1  # the second val image is not on disk
    (root / "places365_val.txt").write_text("Places365_val_00000001.jpg 7\n")
    with pytest.raises(ShardError, match="places365_val.txt:1: expected '<image> <category index>'"):
        convert("places365", tmp_path / "bad", root=root, split="val")


def test_inat2018_json(tmp_path):
    root = tmp_path / "inat"
    categories = [{"id": 0, "name": "Aves sp."}, {"id": 1, "name": "Plantae sp."}]
    images, annotations = [], []
    for i in range(4):
        rel = f"train_val2018/Kingdom/{i % 2}/{i:032x}.jpg"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        classification_image(rng(600 + i), "disc", "green").save(root / rel)
        images.append({"id": 10 + i, "file_name": rel, "width": 96, "height": 96})
        annotations.append({"id": i, "image_id": 10 + i, "category_id": i % 2})
    (root / "train2018.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    (root / "categories.json").write_text(json.dumps(categories))  # 2018 ships the categories apart
    index = same_output_for_any_worker_count(tmp_path, "inat2018", root=root, split="train")
    assert index["classes"] == ["Aves sp.", "Plantae sp."] and index["num_samples"] == 4
    assert [v["cls"] for _, v in sorted(samples_of(tmp_path / "w1").items())] == [b"0", b"1", b"0", b"1"]
    (root / "val2018.json").write_text(json.dumps({"images": images[:1], "annotations": []}))
    with pytest.raises(ShardError, match=r"val2018.json: image 10 \(train_val2018/Kingdom/0/0+.jpg\) has no"):
        convert("inat2018", tmp_path / "val", root=root, split="val")


# ------------------------------------------------------------------------------------------------ detection

def voc_xml(name, width, height, objects):
    body = "".join(f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
                   f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>" for n, b, d in objects)
    return (f"<annotation><filename>{name}.jpg</filename><size><width>{width}</width><height>{height}</height>"
            f"<depth>3</depth></size>{body}</annotation>")


def test_voc_layout_boxes_difficult_and_bad_input(tmp_path, caplog):
    write_voc(tmp_path / "voc", seed=0, trainval=4, test=2)
    voc = tmp_path / "voc" / "VOCdevkit" / "VOC2007"
    convert("voc", tmp_path / "as-written", root=tmp_path / "voc", split="trainval")
    natural = [json.loads(m["json"]) for m in samples_of(tmp_path / "as-written").values()]
    assert any(1 in m["difficult"] for m in natural)  # the world's small boxes are flagged difficult
    (voc / "Annotations" / "000001.xml").write_text(voc_xml("000001", 128, 96, [
        ("aeroplane", [1, 1, 10, 20], 0), ("bicycle", [5, 5, 50, 40], 1), ("unicorn", [2, 2, 9, 9], 0),
        ("car", [100, 10, 140, 30], 0)]))  # an unknown class, then a box past the 128-pixel width
    (voc / "ImageSets" / "Main" / "trainval.txt").write_text("000001\n000002\n000003\n000099\n")  # 000099: no files
    with caplog.at_level(logging.WARNING):
        index = same_output_for_any_worker_count(tmp_path, "voc", root=tmp_path / "voc", split="trainval")
    assert "unknown class 'unicorn'" in caplog.text and "000099.jpg is missing" in caplog.text
    assert "outside the 128x96 image" in caplog.text
    assert index["metric"] == "voc" and index["voc_ap"] == "11point" and index["num_classes"] == 20
    assert index["dropped_boxes"] == 2 and index["missing_samples"] == 1 and index["num_samples"] == 3
    members = samples_of(tmp_path / "w1")["000001"]
    meta = json.loads(members["json"])
    assert meta["boxes"] == [[0.0, 0.0, 10.0, 20.0], [4.0, 4.0, 46.0, 36.0]]  # [xmin - 1, ymin - 1, w, h]
    assert meta["labels"] == [0, 1] and meta["category_ids"] == [1, 2]
    assert meta["difficult"] == [0, 1] and meta["iscrowd"] == [0, 1]
    # evaluation keeps the difficult box (flagged); training drops it
    for train, labels in ((False, [0, 1]), (True, [0])):
        item = make_decoder(PipelineConfig("detection", (128, 128)), train=train)(
            {"__key__": "000001", **members}, np.random.default_rng(0))
        assert item["labels"].tolist() == labels
    with pytest.raises(ShardError, match="Dataset not found"):
        convert("voc", tmp_path / "none", root=tmp_path / "voc", year="2012", split="train")


def test_voc_ap_methods_match_hand_computation():
    # detections by score: TP, FP, TP, FP, TP with 4 positives: recall .25 .25 .5 .5 .75, precision 1 .5 .667 .5 .6
    recall = np.array([0.25, 0.25, 0.5, 0.5, 0.75])
    precision = np.array([1.0, 0.5, 2 / 3, 0.5, 0.6])
    # 11-point: t = 0, .1, .2 -> 1; t = .3 .. .5 -> 2/3; t = .6, .7 -> .6; t = .8 .. 1 -> 0
    assert voc_ap(recall, precision, "11point") == pytest.approx((3 * 1 + 3 * 2 / 3 + 2 * 0.6) / 11)
    # area: envelope 1 on [0, .25], 2/3 on (.25, .5], .6 on (.5, .75], nothing past .75
    assert voc_ap(recall, precision, "area") == pytest.approx(0.25 * 1 + 0.25 * 2 / 3 + 0.25 * 0.6)


def test_voc_map_matching_difficult_duplicates_and_classes():
    cats = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 3, "name": "car"}]
    ann = [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "iscrowd": 0},
           {"image_id": 1, "category_id": 1, "bbox": [20, 20, 10, 10], "iscrowd": 1},  # difficult
           {"image_id": 2, "category_id": 1, "bbox": [0, 0, 10, 10], "iscrowd": 0},
           {"image_id": 2, "category_id": 2, "bbox": [5, 5, 20, 20], "iscrowd": 0},
           {"image_id": 3, "category_id": 3, "bbox": [0, 0, 5, 5], "iscrowd": 1}]  # car: only a difficult box
    det = [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.9},    # TP
           {"image_id": 1, "category_id": 1, "bbox": [20, 20, 10, 10], "score": 0.8},  # on the difficult: ignored
           {"image_id": 1, "category_id": 1, "bbox": [1, 0, 10, 10], "score": 0.7},    # duplicate of the first: FP
           {"image_id": 2, "category_id": 1, "bbox": [0, 0, 10, 9.9], "score": 0.6},   # TP (IoU 0.99)
           {"image_id": 2, "category_id": 2, "bbox": [5, 5, 20, 9], "score": 0.5},     # IoU 0.45 < 0.5: FP
           {"image_id": 3, "category_id": 3, "bbox": [0, 0, 5, 5], "score": 0.4}]
    gt = {"categories": cats, "annotations": ann}
    result = voc_map(gt, det, "area")
    # cat: TP FP TP over 2 positives: recall .5 .5 1, precision 1 .5 .667 -> .5 * 1 + .5 * 2/3; dog: 0; car: none
    assert result["per_class_ap"] == pytest.approx({"cat": 100 * (0.5 + 0.5 * 2 / 3), "dog": 0.0})
    assert result["mAP"] == pytest.approx(100 * (0.5 + 0.5 * 2 / 3) / 2)
    cat_11 = (6 * 1 + 5 * 2 / 3) / 11  # recall .5 reached at precision 1, recall 1 at 2/3
    assert voc_map(gt, det, "11point")["per_class_ap"]["cat"] == pytest.approx(100 * cat_11)


# --------------------------------------------------------------------------------------------- segmentation

# Cityscapes label ids -> train ids (torchvision's table): 0 unlabeled, 1 ego vehicle, 29 caravan (not evaluated)
# -> 255; 7 road -> 0; 19 traffic light -> 6; 23 sky -> 10
CITY_IDS = {0: 255, 1: 255, 7: 0, 19: 6, 23: 10, 29: 255}


def test_cityscapes_label_ids_become_train_ids_with_ignore(tmp_path, caplog):
    root = tmp_path / "cityscapes"
    write_cityscapes(root, seed=0, train=3, val=1)
    for path in (root / "gtFine" / "train").rglob("*_labelIds.png"):  # the ego vehicle's bonnet, a caravan
        ids = np.array(Image.open(path))
        ids[-2:, :], ids[:3, :4] = 1, 29
        Image.fromarray(ids).save(path)
        path.with_name(path.name.replace("labelIds", "color")).write_bytes(b"not read")
    index = same_output_for_any_worker_count(tmp_path, "cityscapes", root=root, split="train")
    assert index["num_classes"] == 19 and index["classes"][:3] == ["road", "sidewalk", "building"]
    assert index["ignore_index"] == 255 and index["num_samples"] == 3 and index["skipped"] == 0
    for key, members in samples_of(tmp_path / "w1").items():
        city = key.split("_")[0]
        source = np.asarray(Image.open(root / "gtFine" / "train" / city / f"{key}_gtFine_labelIds.png"))
        stored = np.asarray(Image.open(io.BytesIO(members["png"])))
        expected = np.vectorize(CITY_IDS.get)(source)
        assert np.array_equal(stored, expected)
        h, w = source.shape
        item = make_decoder(PipelineConfig("segmentation", (h, w)), train=False)({"__key__": key, **members}, None)
        assert torch.equal(item["mask"], torch.from_numpy(expected.astype(np.int64)))  # 255 stays IGNORE_INDEX
        assert set(item["mask"].unique().tolist()) == {0, 6, 10, IGNORE_INDEX}
    # a mask of the wrong size is skipped, named
    bad = next((root / "gtFine" / "train" / "aachen").glob("*_labelIds.png"))
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(bad)
    with caplog.at_level(logging.WARNING):
        index = convert("cityscapes", tmp_path / "bad", root=root, split="train")
    assert index["num_samples"] == 2 and index["skipped"] == 1
    assert f"{bad.name}: mask size differs from image size" in caplog.text


def test_nyu40_layout_zero_is_unlabelled(tmp_path):
    root = tmp_path / "nyu"
    for split in ("train", "test"):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
    Image.fromarray(np.full((8, 12, 3), 120, np.uint8)).save(root / "images" / "train" / "0003.png")
    Image.fromarray(np.array([0, 1, 40] * 32, np.uint8).reshape(8, 12)
                    ).save(root / "annotations" / "train" / "0003.png")
    index = same_output_for_any_worker_count(tmp_path, "nyu", root=root, split="train")
    assert index["num_classes"] == 40 and index["classes"][:2] == ["wall", "floor"] and index["num_samples"] == 1
    members = samples_of(tmp_path / "w1")["0003"]
    item = make_decoder(PipelineConfig("segmentation", (8, 12)), train=False)({"__key__": "0003", **members}, None)
    assert set(item["mask"].unique().tolist()) == {0, 39, IGNORE_INDEX}


def write_masks(root, values):
    for i, vals in enumerate(values):
        (root / "img").mkdir(parents=True, exist_ok=True)
        (root / "ann").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 12, 3), 90, np.uint8)).save(root / "img" / f"s{i}.jpg")
        Image.fromarray(np.array(vals, np.uint8).repeat(4).reshape(8, 12)).save(root / "ann" / f"s{i}.png")


def test_masks_keep_the_ignore_value_and_refuse_other_labels(tmp_path, caplog):
    values = [[0, 1, 255] * 8, [2, 2, 3] * 8, [0, 9, 1] * 8]  # 9 is neither a class of 4 nor 255
    write_masks(tmp_path, values)
    with caplog.at_level(logging.WARNING):
        index = same_output_for_any_worker_count(tmp_path, "masks", images=tmp_path / "img", masks=tmp_path / "ann",
                                                 split="train", num_classes=4)
    assert index["num_samples"] == 2 and index["skipped"] == 1 and index["ignore_index"] == 255
    assert "s2.png: mask label 9 is neither a class (values 0-3 for num_classes=4) nor the ignore value 255" \
        in caplog.text
    members = samples_of(tmp_path / "w1")["s0"]
    assert members["png"] == (tmp_path / "ann" / "s0.png").read_bytes()  # stored unchanged
    item = make_decoder(PipelineConfig("segmentation", (8, 12)), train=False)({"__key__": "s0", **members}, None)
    assert set(item["mask"].unique().tolist()) == {0, 1, IGNORE_INDEX}
    # a label map: stored values 1 -> 0, 9 -> 3; every other value (0, 2, 3, 255) ignored
    (tmp_path / "map.json").write_text('{"1": 0, "9": 3}')
    index = convert("masks", tmp_path / "mapped", images=tmp_path / "img", masks=tmp_path / "ann", split="train",
                    num_classes=4, label_map=tmp_path / "map.json")
    assert index["num_samples"] == 3 and index["skipped"] == 0
    stored = np.asarray(Image.open(io.BytesIO(samples_of(tmp_path / "mapped")["s2"]["png"])))
    assert set(np.unique(stored).tolist()) == {0, 3, 255}
    (tmp_path / "map.json").write_text('{"1": 300}')
    with pytest.raises(ShardError, match="map.json: not a label map"):
        convert("masks", tmp_path / "m2", images=tmp_path / "img", masks=tmp_path / "ann", split="train",
                num_classes=4, label_map=tmp_path / "map.json")
    with pytest.raises(ShardError, match="give --num-classes or --classes"):
        convert("masks", tmp_path / "m3", images=tmp_path / "img", masks=tmp_path / "ann", split="train")


def test_ignored_pixels_count_in_neither_loss_nor_metric():
    from mthl_ds.models.heads import UperNetSegmentationHead
    target = torch.tensor([[[0, 1, IGNORE_INDEX, IGNORE_INDEX]]])
    scores = []
    for pred in (torch.tensor([[[0, 1, 0, 0]]]), torch.tensor([[[0, 1, 1, 1]]])):  # right, or wrong where ignored
        ev = SegmentationEvaluator(2)
        ev.update(pred, {"mask": target, "valid": torch.tensor([True])})
        scores.append(ev.result(lambda x: x, lambda x: [x])["mIoU"])
    assert scores == [100.0, 100.0]
    logits = torch.randn(1, 2, 1, 4)
    changed = logits.clone()
    changed[..., 2:] = torch.randn(1, 2, 1, 2) * 10
    loss = [UperNetSegmentationHead.loss(None, {"logits": x}, {"mask": target})[0] for x in (logits, changed)]
    assert torch.equal(loss[0], loss[1])


# ------------------------------------------------------------------------------------- adapting to each kind

@pytest.fixture(scope="module")
def downstream_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("downstream")
    write_oxford_pets(root / "raw" / "oxford-iiit-pet", PETS_CLASSES, 0, 3, 2)
    write_voc(root / "raw" / "voc", 0, trainval=6, test=3)
    write_cityscapes(root / "raw" / "cityscapes", 0, train=4, val=2)
    sets = root / "shards"
    for split, layout_split in (("train", "trainval"), ("val", "test")):
        convert("pets", sets / "pets" / split, root=root / "raw" / "oxford-iiit-pet", split=layout_split)
        convert("voc", sets / "voc" / split, root=root / "raw" / "voc", split=layout_split)
        convert("cityscapes", sets / "cityscapes" / split, root=root / "raw" / "cityscapes", split=split)
    return sets


@pytest.mark.parametrize("name, size, metric", [("pets", (64, 64), "top1"), ("voc", (128, 128), "mAP"),
                                                ("cityscapes", (64, 64), "mIoU")])
def test_adapting_an_export_to_each_kind_of_downstream_set(downstream_sets, name, size, metric, tmp_path):
    from mthl_ds.adapt import NewDataset, phase_recipe, run_phase
    from mthl_ds.artifacts.export import read_metadata, save_export
    from mthl_ds.build import build_model
    from mthl_ds.config import load_recipe
    source = save_export(tmp_path / "demo.safetensors", build_model(load_recipe("demo")), {"note": "fresh"})
    data = NewDataset(name, downstream_sets / name, size, batch_size=2, head_channels=32)
    recipe = phase_recipe(source, data, {}, None, {"steps": 3, "warmup_steps": 1, "workers": 0, "log_every": 1})
    results, export = run_phase(recipe, tmp_path / name)
    assert results[name]["metric"] == metric and np.isfinite(results[name]["value"])
    if name == "voc":
        assert results[name]["all"]["ap_method"] == "voc_11point"
        from mthl_ds.evaluate import run_evaluate  # mthl-ds evaluate scores and describes it the same way
        summary = run_evaluate(export, [(name, downstream_sets / name)])
        assert summary["protocol"][name].startswith("VOC mAP at IoU 0.5 (11point)")
        assert summary["results"][name]["all"]["ap_method"] == "voc_11point"
    assert read_metadata(export)["model"]["heads"] == [name]

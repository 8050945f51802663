"""The one image reader (EXIF orientation, every pixel mode against its 8-bit twin, errors that say what
happened), sample keys unique in every converter, banded segmentation resizing, and backbones that take any size."""
import io
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from test_data import all_samples

from mthl_ds.data.convert import convert
from mthl_ds.data.images import ImageReadError, read_rgb, rgb_from_bytes, to_rgb
from mthl_ds.data.pipelines import PipelineConfig, make_decoder
from mthl_ds.data.shards import Sample, ShardError, write_shard_set
from mthl_ds.geometry import padded
from mthl_ds.models.backbone import build_backbone
from mthl_ds.models.heads import resized_argmax


def photo(width=48, height=32, seed=0, noise=True):
    """An 8-bit RGB image with no symmetry (a gradient, plus noise), so that every orientation differs."""
    yy, xx = np.mgrid[0:height, 0:width]
    noise = np.random.default_rng(seed).integers(0, 40, size=(height, width, 3)) if noise else 0
    rgb = np.stack([xx * 200 // width, yy * 200 // height, (xx + 2 * yy) % 200], axis=-1) + noise
    return Image.fromarray(rgb.astype(np.uint8))


def saved(img, path, **kwargs):
    img.save(path, **kwargs)
    return path


def grey(img):
    return np.asarray(img.convert("L"))


# --------------------------------------------------------------------------------------------- the reader

# EXIF orientation -> how the stored pixels were made from the upright image (the inverse of what a viewer does)
STORED_FROM_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                       4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                       6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_270}


@pytest.mark.parametrize("orientation", range(2, 9))
def test_exif_orientation_is_applied_as_viewers_show_the_image(orientation, tmp_path):
    """A file stored turned, with the EXIF orientation that turns it back (as phones write them), reads as the
    upright image: exactly for PNG; JPEG (lossy) as PIL's own ``exif_transpose`` turns it."""
    upright = photo()
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored = upright.transpose(STORED_FROM_UPRIGHT[orientation])
    png = saved(stored, tmp_path / "turned.png", exif=exif)
    read = read_rgb(png)
    assert read.size == upright.size and np.array_equal(np.asarray(read), np.asarray(upright))
    assert np.array_equal(np.asarray(to_rgb(read)), np.asarray(upright))  # read again: not turned twice
    jpeg = saved(stored, tmp_path / "turned.jpg", exif=exif, quality=95)
    read = read_rgb(jpeg)
    assert read.size == upright.size
    assert np.array_equal(np.asarray(read), np.asarray(ImageOps.exif_transpose(Image.open(jpeg)).convert("RGB")))
    assert stored.size != upright.size or orientation in (2, 3, 4)  # 5-8 swap width and height


def test_every_pixel_mode_reads_as_its_8_bit_twin(tmp_path):
    """Each mode against the 8-bit image it encodes: 16-bit grey (PNG and TIFF) scaled by 255 / 65535, float
    TIFF as 0-1, grey with alpha, palette with transparency, RGBA, 1-bit, CMYK JPEG (within JPEG's loss)."""
    base = photo()
    g = grey(base)
    twins = {}
    sixteen = Image.fromarray(g.astype(np.uint16) * 257)
    twins["16-bit PNG"] = (saved(sixteen, tmp_path / "g16.png"), g)
    twins["16-bit TIFF"] = (saved(sixteen, tmp_path / "g16.tif"), g)
    twins["float TIFF"] = (saved(Image.fromarray(g.astype(np.float32) / 255), tmp_path / "f.tif"), g)
    la = Image.merge("LA", (Image.fromarray(g), Image.fromarray(np.full_like(g, 7))))
    twins["LA"] = (saved(la, tmp_path / "la.png"), g)
    rgba = base.copy()
    rgba.putalpha(Image.fromarray(np.tile(np.arange(48, dtype=np.uint8) * 5, (32, 1))))
    twins["RGBA"] = (saved(rgba, tmp_path / "rgba.png"), np.asarray(base))
    palette = base.quantize(16)
    twins["P with transparency"] = (saved(palette, tmp_path / "p.png", transparency=3),
                                    np.asarray(palette.convert("RGB")))
    one_bit = Image.fromarray(g > 128).convert("1")
    twins["1-bit"] = (saved(one_bit, tmp_path / "bits.png"), np.where(g > 128, 255, 0).astype(np.uint8))
    for name, (path, twin) in twins.items():
        read = np.asarray(read_rgb(path))
        assert read.shape == (32, 48, 3) and read.dtype == np.uint8, name
        expected = twin if twin.ndim == 3 else np.repeat(twin[..., None], 3, axis=-1)
        assert np.array_equal(read, expected), name
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")  # really 16 bits on disk
    smooth = photo(noise=False)  # JPEG keeps smooth pictures nearly intact
    cmyk = saved(smooth.convert("CMYK"), tmp_path / "cmyk.jpg", quality=95)
    assert Image.open(cmyk).mode == "CMYK"
    difference = np.abs(np.asarray(read_rgb(cmyk), np.int16) - np.asarray(smooth, np.int16))
    assert difference.mean() < 2 and difference.max() < 16
    # what convert("RGB") did to the 16-bit file: all white, where the reader keeps the picture
    assert (np.asarray(Image.open(tmp_path / "g16.png").convert("RGB")) == 255).mean() > 0.99
    # a 32-bit integer image past 16 bits and a mode PIL cannot convert are refused, naming file and mode
    wide = saved(Image.fromarray(np.full((4, 4), 1 << 20, dtype=np.int32), mode="I"), tmp_path / "wide.tif")
    with pytest.raises(ImageReadError, match=r"wide.tif: unsupported pixel mode 'I' with values 1048576"):
        read_rgb(wide)
    with pytest.raises(ImageReadError, match=r"hsv: unsupported pixel mode 'HSV'"):
        to_rgb(Image.new("HSV", (4, 4)), "hsv")


def test_errors_say_what_happened(tmp_path):
    """Not found, a folder, not an image, truncated (PIL's reason), permission denied (checked as an unprivileged
    user where the tests run as root, who may read any file)."""
    with pytest.raises(ImageReadError, match=r"gone.jpg: file not found"):
        read_rgb(tmp_path / "gone.jpg")
    with pytest.raises(ImageReadError, match=r": is a folder, not an image file"):
        read_rgb(tmp_path)
    (tmp_path / "notes.jpg").write_text("not an image")
    with pytest.raises(ImageReadError, match=r"notes.jpg: does not decode as an image \(cannot identify image"):
        read_rgb(tmp_path / "notes.jpg")
    whole = io.BytesIO()
    photo(200, 200).save(whole, format="JPEG")
    (tmp_path / "cut.jpg").write_bytes(whole.getvalue()[:1500])
    with pytest.raises(ImageReadError, match=r"cut.jpg: does not decode as an image \(image file is truncated"):
        read_rgb(tmp_path / "cut.jpg")
    locked = tmp_path / "photo.png"
    photo().save(locked)
    locked.chmod(0)
    root = os.geteuid() == 0
    if root:
        os.seteuid(65534)  # nobody, for this check only
    try:
        with pytest.raises(ImageReadError, match=r"photo.png: permission denied"):
            read_rgb(locked)
    finally:
        if root:
            os.seteuid(0)


def test_converted_samples_and_pipelines_use_the_displayed_frame(tmp_path):
    """A phone photo (stored 48x32, orientation 6) converts with its upright size (32x48) in the sample's
    metadata, its bytes unchanged, and the pipeline decodes it upright."""
    exif = Image.Exif()
    exif[0x0112] = 6
    upright = photo(32, 48)
    (tmp_path / "images").mkdir()
    data = io.BytesIO()
    upright.transpose(Image.Transpose.ROTATE_90).save(data, format="PNG", exif=exif)
    (tmp_path / "images" / "phone.png").write_bytes(data.getvalue())
    ann = {"images": [{"id": 7, "file_name": "phone.png", "width": 32, "height": 48}],
           "categories": [{"id": 1, "name": "thing"}],
           "annotations": [{"id": 1, "image_id": 7, "category_id": 1, "bbox": [2, 30, 20, 15], "iscrowd": 0}]}
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    convert("coco", tmp_path / "out", split="val", images=tmp_path / "images", annotations=tmp_path / "ann.json")
    (key, members), = all_samples(tmp_path / "out")
    meta = json.loads(members["json"])
    assert key == "000000000007" and (meta["width"], meta["height"]) == (32, 48)
    assert members["png"] == data.getvalue()
    assert np.array_equal(np.asarray(rgb_from_bytes(members["png"])), np.asarray(upright))
    item = make_decoder(PipelineConfig("detection", (64, 64)), train=False)({"__key__": key, **members}, None)
    assert item["orig_size"] == (48, 32)


# ------------------------------------------------------------------------------------------------- keys

def two_of_a_stem(folder, stem="000000000001", ext="jpg"):
    """The same file name in two folders, a/ and b/, with different pixels."""
    paths = []
    for i, sub in enumerate("ab"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        paths.append(saved(photo(seed=i), folder / sub / f"{stem}.{ext}"))
    return paths


def read_back(out):
    samples = all_samples(out)
    assert len(samples) == 2 and len({k for k, _ in samples}) == 2, [k for k, _ in samples]
    return sorted(k for k, _ in samples)


def test_files_of_one_stem_in_two_folders_stay_two_samples_in_every_converter(tmp_path):
    # COCO: the key is the image id
    two_of_a_stem(tmp_path / "coco")
    images = [{"id": i + 1, "file_name": f"{s}/000000000001.jpg", "width": 48, "height": 32}
              for i, s in enumerate("ab")]
    (tmp_path / "coco.json").write_text(json.dumps({"images": images, "annotations": [],
                                                    "categories": [{"id": 1, "name": "x"}]}))
    index = convert("coco", tmp_path / "coco_out", split="val", images=tmp_path / "coco", annotations=tmp_path /
                    "coco.json")
    assert index["num_samples"] == 2 and read_back(tmp_path / "coco_out") == ["000000000001", "000000000002"]
    # VOC: the key is the ImageSets id, here with folders
    voc = tmp_path / "voc" / "VOCdevkit" / "VOC2007"
    two_of_a_stem(voc / "JPEGImages", "000001")
    for sub in "ab":
        (voc / "Annotations" / sub).mkdir(parents=True)
        (voc / "Annotations" / sub / "000001.xml").write_text(
            "<annotation><filename>000001.jpg</filename><size><width>48</width><height>32</height><depth>3</depth>"
            "</size><object><name>cat</name><difficult>0</difficult><bndbox><xmin>2</xmin><ymin>2</ymin>"
            "<xmax>20</xmax><ymax>20</ymax></bndbox></object></annotation>")
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    (voc / "ImageSets" / "Main" / "trainval.txt").write_text("a/000001\nb/000001\n")
    assert convert("voc", tmp_path / "voc_out", root=tmp_path / "voc", split="trainval")["num_samples"] == 2
    assert read_back(tmp_path / "voc_out") == ["a_000001", "b_000001"]
    # imagefolder: the path below the root
    two_of_a_stem(tmp_path / "folder" / "cat", "img")
    convert("imagefolder", tmp_path / "folder_out", root=tmp_path / "folder", split="train")
    assert read_back(tmp_path / "folder_out") == ["cat_a_img", "cat_b_img"]
    # masks: the path below the images folder
    two_of_a_stem(tmp_path / "seg" / "images", "img")
    for sub in "ab":
        (tmp_path / "seg" / "masks" / sub).mkdir(parents=True)
        Image.fromarray(np.zeros((32, 48), np.uint8)).save(tmp_path / "seg" / "masks" / sub / "img.png")
    convert("masks", tmp_path / "seg_out", images=tmp_path / "seg" / "images", masks=tmp_path / "seg" / "masks",
            split="train", num_classes=2)
    assert read_back(tmp_path / "seg_out") == ["a_img", "b_img"]
    # CUB: the image id of images.txt
    cub = tmp_path / "CUB_200_2011"
    two_of_a_stem(cub / "images", "bird")
    for name, lines in (("images.txt", ["1 a/bird.jpg", "2 b/bird.jpg"]), ("image_class_labels.txt", ["1 1", "2 2"]),
                        ("train_test_split.txt", ["1 1", "2 1"]), ("classes.txt", ["1 a", "2 b"])):
        (cub / name).write_text("\n".join(lines) + "\n")
    convert("cub", tmp_path / "cub_out", root=cub, split="train")
    assert read_back(tmp_path / "cub_out") == ["000000000001", "000000000002"]
    # iNaturalist: the image id of the JSON
    inat = tmp_path / "inat"
    two_of_a_stem(inat / "train_val2018", "leaf")
    (inat / "train2018.json").write_text(json.dumps({
        "images": [{"id": 10 + i, "file_name": f"train_val2018/{s}/leaf.jpg"} for i, s in enumerate("ab")],
        "annotations": [{"id": i, "image_id": 10 + i, "category_id": i} for i in range(2)],
        "categories": [{"id": 0, "name": "x"}, {"id": 1, "name": "y"}]}))
    convert("inat2018", tmp_path / "inat_out", root=inat, split="train")
    assert read_back(tmp_path / "inat_out") == ["000000000010", "000000000011"]


def test_the_shard_writer_refuses_a_duplicate_key_naming_both_files(tmp_path):
    a, b = two_of_a_stem(tmp_path / "src")
    samples = [Sample("same", a, {"class_id": 0}), Sample("same", b, {"class_id": 1})]
    with pytest.raises(ShardError, match=rf"{a} and {b} would both be stored as sample 'same'"):
        write_shard_set("classification", samples, tmp_path / "out", 8, 1, classes=["x", "y"], dataset="d",
                        split="train", num_classes=2)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


# ------------------------------------------------------------------------------------ resizing and sizes

@pytest.mark.parametrize("classes, source, size", [(4, (37, 53), (600, 401)), (150, (128, 96), (1000, 750)),
                                                   (21, (512, 341), (333, 222)), (3, (1, 1), (4, 4))])
def test_banded_resize_and_argmax_gives_the_labels_of_the_whole_image_resize(classes, source, size):
    """Bands of a few rows (so every band boundary is crossed), the labels of PyTorch's bilinear resize of the
    whole image, everywhere."""
    logits = torch.randn(classes, *source, generator=torch.Generator().manual_seed(classes))
    whole = F.interpolate(logits[None], size=size, mode="bilinear", align_corners=False)[0].argmax(0)
    banded = resized_argmax(logits, size, max_elements=classes * size[1] * 7)
    assert banded.shape == size and torch.equal(banded, whole)


def test_every_backbone_takes_any_input_size():
    """A raw 100 x 133 image runs through every backbone kind. Swin pads it to the canvas the detection pipeline
    makes (here 128 x 160), so its stage features equal those of that canvas; timm's Swin alone would refuse a
    width that its patch does not divide."""
    x = torch.randn(1, 3, 100, 133, generator=torch.Generator().manual_seed(0))
    for name in ("swin_debug", "davit_debug", "vit_debug"):
        backbone = build_backbone(name, ["a"], None, img_size=64).eval()
        backbone.set_dataset("a")
        with torch.no_grad():
            features = backbone(x)
            assert [f.shape[1] for f in features] == backbone.stage_channels, name
            if name == "swin_debug":
                canvas_h, canvas_w = padded((100, 133))
                canvas = backbone(F.pad(x, (0, canvas_w - 133, 0, canvas_h - 100)))
                assert all(torch.equal(a, b) for a, b in zip(features, canvas))
                assert [f.shape[-2:] for f in features] == [(canvas_h // s, canvas_w // s) for s in (4, 8, 16, 32)]
    swin = build_backbone("swin_debug", ["a"], None, img_size=64).net
    with pytest.raises(Exception, match="divisible by patch size"):  # what the padding spares the user
        swin(x)

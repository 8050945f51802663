"""Input sizes at the paper's shapes: the sizes each backbone accepts, the padded detection canvas, portrait
images, anchors at mmdet's strides, and Swin's window shift decided per input."""
import io
import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from mthl_ds.config import ConfigError, load_recipe
from mthl_ds.data.pipelines import PipelineConfig, detection_decoder
from mthl_ds.geometry import nearest_valid, padded, size_problem, smallest_side, swin_window
from mthl_ds.models.backbone import BACKBONES, create_timm
from mthl_ds.models.heads import RetinaNetDetectionHead


def test_paper_detection_canvas_is_padded_to_32_as_mmdet():
    assert padded((800, 1333)) == (800, 1344)
    assert size_problem("swin_tiny_patch4_window7_224", 224, "detection", (800, 1333)) is None
    recipe = load_recipe("mthl_swin_t")
    for name, d in recipe.datasets.items():
        assert size_problem(recipe.model.backbone, recipe.model.img_size, d.task, d.size) is None, name


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_accepted_sizes_give_exact_stage_strides_and_every_backbone_takes_them(backbone):
    """What the check accepts, timm's model takes, with stage features at exactly H/4 .. H/32."""
    img_size = 64 if "debug" in backbone else 224
    net = create_timm(backbone, img_size).eval()
    low = smallest_side(backbone, img_size)
    h, w = low, low + 32
    assert size_problem(backbone, img_size, "segmentation", (h, w)) is None
    with torch.no_grad():
        features = net.forward_intermediates(torch.zeros(1, 3, h, w), intermediates_only=True)
    if backbone.startswith("vit"):
        assert {tuple(f.shape[-2:]) for f in features} == {(h // 16, w // 16)}
    else:
        assert [tuple(f.shape[-2:]) for f in features] == [(h // s, w // s) for s in (4, 8, 16, 32)]


def test_swin_window_sizes_match_timm():
    for backbone in [b for b in BACKBONES if b.startswith("swin")]:
        img_size = 64 if "debug" in backbone else 224
        net = create_timm(backbone, img_size)
        assert net.layers[0].blocks[0].window_size[0] == swin_window(backbone), backbone
        last = net.layers[-1].blocks[0].window_size[0]
        assert smallest_side(backbone, img_size) == 32 * last, backbone


def test_swin_refuses_what_timm_refuses_or_pads_and_names_the_nearest_valid_size():
    with pytest.raises(AssertionError, match="divisible by patch size"):
        create_timm("swin_tiny_patch4_window7_224", 224).forward_intermediates(torch.zeros(1, 3, 512, 1333))
    cases = {("ade20k", "[500, 500]"): "[512, 512]", ("imagenet", "[192, 192]"): "[224, 224]",
             ("imagenet", "[240, 240]"): "[256, 256]"}
    for (name, size), nearest in cases.items():
        with pytest.raises(ConfigError) as e:
            load_recipe("mthl_swin_t", [f"datasets.{name}.size={size}"])
        message = str(e.value)
        assert f"datasets.{name}.size={size}" in message and "swin_tiny_patch4_window7_224" in message
        assert f"nearest valid: {nearest}" in message
    assert nearest_valid((1333, 800), "davit_tiny", 224) == (1344, 800)
    with pytest.raises(ConfigError, match=r"datasets.coco.size=\[100, 100\]: its detection canvas \[128, 128\]"):
        load_recipe("mthl_swin_t", ["datasets.coco.size=[100, 100]"])
    load_recipe("mthl_davit_t", ["datasets.ade20k.size=[640, 640]"])


def detection_sample(width: int, height: int, boxes: list) -> dict:
    data = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), 128, np.uint8)).save(data, format="JPEG")
    meta = {"image_id": 1, "boxes": boxes, "labels": [0] * len(boxes), "iscrowd": [0] * len(boxes),
            "height": height, "width": width}
    return {"jpg": data.getvalue(), "json": json.dumps(meta).encode()}


def test_detection_canvas_landscape_as_mmdet_and_portrait_fitted_to_its_height():
    decode = detection_decoder(PipelineConfig("detection", (800, 1333)), train=False)
    landscape = decode(detection_sample(640, 480, [[10.0, 20.0, 100.0, 50.0]]), None)
    assert landscape["image"].shape == (3, 800, 1344)
    assert landscape["scale"] == pytest.approx(800 / 480)  # mmdet: min(1333 / 640, 800 / 480), then pad
    x, y = 1067 / 640, 800 / 480  # mmdet's scale_factor: 640 x 480 -> 1067 x 800 px, each axis its own
    assert landscape["boxes"][0].tolist() == pytest.approx([10 * x, 20 * y, 110 * x, 70 * y])
    portrait = decode(detection_sample(480, 640, [[0.0, 600.0, 480.0, 40.0]]), None)
    assert portrait["image"].shape == (3, 800, 1344)
    assert portrait["scale"] == pytest.approx(800 / 640)  # fitted to the canvas height (mmdet: 800 / 480)
    assert portrait["boxes"][0, 3].item() == pytest.approx(800)  # the box reaching the bottom edge stays inside
    image = portrait["image"]
    assert image[:, :, 600:].abs().sum() == 0 and image[:, :, :600].abs().sum() > 0  # padded right of 600 px


def test_training_boxes_are_filtered_and_clipped_as_mmdets_coco_pipeline():
    """Training learns no crowd box, none under 1 px wide or high, none of area 0 (mmdet's ``CocoDataset``), and
    clips a box crossing the image's edge to the resized image (``clip_object_border``), not the canvas;
    evaluation keeps every box as it is. An image with a side under 32 px is not trained on (``min_size=32``)."""
    boxes = [[600.0, 10.0, 100.0, 50.0], [10.0, 10.0, 0.5, 30.0], [20.0, 20.0, 30.0, 30.0], [40.0, 40.0, 10.0, 10.0],
             [50.0, 50.0, 20.0, 20.0]]
    sample = detection_sample(640, 480, boxes)
    meta = json.loads(sample["json"])
    meta.update(iscrowd=[0, 0, 1, 0, 0], areas=[5000.0, 15.0, 900.0, 0.0, 400.0], labels=[0, 1, 2, 3, 4])
    sample["json"] = json.dumps(meta).encode()
    train = detection_decoder(PipelineConfig("detection", (800, 1333)), train=True)
    rng = np.random.default_rng(1)
    while (item := train(sample, rng))["boxes"][0, 0] < 500:  # until a draw without the flip
        pass
    x, y = 1067 / 640, 800 / 480
    assert item["labels"].tolist() == [0, 4]
    torch.testing.assert_close(item["boxes"], torch.tensor([[600 * x, 10 * y, 1067, 60 * y],
                                                            [50 * x, 50 * y, 70 * x, 70 * y]]))
    evaluated = detection_decoder(PipelineConfig("detection", (800, 1333)), train=False)(sample, None)
    assert len(evaluated["boxes"]) == 5 and evaluated["boxes"][0, 2] == pytest.approx(700 * x)
    assert train(detection_sample(640, 31, [[1.0, 1.0, 10.0, 10.0]]), rng) is None


def test_anchors_sit_at_mmdet_strides_and_equal_torchvision_where_its_strides_are_right():
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.image_list import ImageList
    head = RetinaNetDetectionHead([32, 64, 128, 256], 3, 64)
    sizes = tuple(tuple(4 * s * 2 ** (i / 3) for i in range(3)) for s in head.strides)
    reference = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * 5)
    for (h, w), agrees in (((512, 768), True), ((800, 1344), False)):
        image = torch.zeros(1, 3, h, w)
        pyramid = [torch.zeros(1, 1, -(-h // s), -(-w // s)) for s in head.strides]
        ours = head.anchors(image, pyramid)[0]
        theirs = reference(ImageList(image, [(h, w)]), pyramid)[0]
        assert ours.dtype == torch.float32 and ours.shape == theirs.shape
        # torchvision rounds its cell anchors to whole pixels; at 800 x 1344 it also places P6 / P7 at 61 / 114 px
        assert ((ours - theirs).abs().max() <= 0.5) == agrees
        p7 = head.level_anchors(pyramid)[-1].view(-1, 9, 4)
        centres = (p7[:, :, :2] + p7[:, :, 2:]) / 2
        assert torch.allclose(centres, (centres / 128).round() * 128, atol=1e-3)


def test_swin_shifts_windows_per_input_as_timm_built_for_that_size():
    torch.manual_seed(0)
    ours = create_timm("swin_tiny_patch4_window7_224", 224).eval()
    plain = timm.create_model("swin_tiny_patch4_window7_224", num_classes=0, dynamic_img_size=True).eval()
    plain.load_state_dict(ours.state_dict())
    for size in ((224, 224), (800, 1344)):
        reference = timm.create_model("swin_tiny_patch4_window7_224", num_classes=0, img_size=size).eval()
        reference.load_state_dict(ours.state_dict())
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            got, expected, built_at_224 = (m.forward_intermediates(x, intermediates_only=True)[-1]
                                           for m in (ours, reference, plain))
        assert torch.equal(got, expected), size
        # timm built at 224 never shifts its last stage: at 800 x 1344 that is another model
        assert torch.equal(built_at_224, expected) == (size == (224, 224))

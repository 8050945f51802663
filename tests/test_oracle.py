"""RetinaNet and UperNet as mmdet 3.3.0 and mmsegmentation 1.2.2 compute them: their own parts, built from the
config files their packages ship (``retinanet_swin-t-p4-w7_fpn_1x_coco``, ``swin-tiny-..._upernet_..._ade20k``),
given the same inputs and weights as ours (the ``oracle`` extra; ``tests/openmmlab.py``). Each comparison states
its tolerance; float32 on the CPU.

Differences kept on purpose, stated where they live (and in the README): one canvas shape per dataset, portrait
images fitted to its height (mmdet pads each batch to its largest image; ``data/pipelines.py``); the detection
loss's avg_factor averaged over the data-parallel ranks (``RetinaNetDetectionHead.loss``); the evaluation resize
(``evaluation.py``); LAMB instead of SGD / AdamW (the paper's). The feature norms' eps differs too (UperNet's
decoder: 1e-6, mmseg's Swin: 1e-5), within the tolerances here."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("mmdet", reason="mmdet is the oracle extra's: pip install -e '.[test,oracle]' (make test does)")
import openmmlab  # noqa: E402

from mthl_ds.geometry import resized_extent  # noqa: E402
from mthl_ds.models.heads import (RetinaNetDetectionHead, UperNetSegmentationHead, encode_deltas,  # noqa: E402
                                  padded_targets)

SWIN_T = [96, 192, 384, 768]
NUM_CLASSES = 5


def randomised(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every float parameter and buffer drawn at random, so a weight copied to the wrong place shows: conv
    weights normal with std 1 / sqrt(fan-in) (activations keep their scale), norm weights and BN variances
    1 + N(0, 0.05), biases and BN means N(0, 0.05)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if not t.is_floating_point():
                continue
            noise = torch.randn(t.shape, generator=g)
            if t.dim() > 1:
                t.copy_(noise / (t[0].numel() ** 0.5))
            else:
                t.copy_(0.05 * noise + (1.0 if name.endswith(("weight", "running_var")) else 0.0))
    return module


def copy(target: torch.nn.Module, source: torch.nn.Module) -> None:
    target.load_state_dict(source.state_dict())


# ----------------------------------------------------------------------------------------------- RetinaNet

def mmdet_retinanet():
    """mmdet's FPN and RetinaHead, built from its config, as initialised there."""
    cfg = openmmlab.retinanet_swin_t()
    head_cfg = cfg.model.bbox_head.copy()
    head_cfg.update(num_classes=NUM_CLASSES, train_cfg=cfg.model.train_cfg, test_cfg=cfg.model.test_cfg)
    return openmmlab.build("mmdet", cfg.model.neck), openmmlab.build("mmdet", head_cfg)


def retinanet_pairs(ours, mm_fpn, mm_head) -> list[tuple[torch.nn.Module, torch.nn.Module]]:
    """(mmdet's module, ours) for every module that holds parameters."""
    pairs = []
    for i in range(3):
        pairs += [(mm_fpn.lateral_convs[i].conv, ours.fpn.inner_blocks[i][0]),
                  (mm_fpn.fpn_convs[i].conv, ours.fpn.layer_blocks[i][0])]
    pairs += [(mm_fpn.fpn_convs[3].conv, ours.fpn.extra_blocks.p6),
              (mm_fpn.fpn_convs[4].conv, ours.fpn.extra_blocks.p7)]
    for i in range(4):
        pairs += [(mm_head.cls_convs[i].conv, ours.head.classification_head.conv[i][0]),
                  (mm_head.reg_convs[i].conv, ours.head.regression_head.conv[i][0])]
    return pairs + [(mm_head.retina_cls, ours.head.classification_head.cls_logits),
                    (mm_head.retina_reg, ours.head.regression_head.bbox_reg)]


@pytest.fixture(scope="module")
def retinanet():
    """(our head, mmdet's FPN, mmdet's RetinaHead) with our weights copied into mmdet's parts."""
    mm_fpn, mm_head = mmdet_retinanet()
    ours = randomised(RetinaNetDetectionHead(SWIN_T, NUM_CLASSES), seed=0)
    for theirs, mine in retinanet_pairs(ours, mm_fpn, mm_head):
        copy(theirs, mine)
    return ours.eval(), mm_fpn.eval(), mm_head.eval()


def swin_features(batch: int, height: int, width: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, c, height // s, width // s, generator=g) for c, s in zip(SWIN_T, (4, 8, 16, 32))]


def mmdet_layout(flat: torch.Tensor, pyramid: list[torch.Tensor]) -> list[torch.Tensor]:
    """Our (B, anchors, C) output as mmdet's per-level (B, A * C, H, W)."""
    sizes = [p.shape[-2] * p.shape[-1] * 9 for p in pyramid]
    return [level.reshape(p.shape[0], p.shape[-2], p.shape[-1], -1).permute(0, 3, 1, 2)
            for level, p in zip(flat.split(sizes, dim=1), pyramid)]


def boxes_batch():
    """Two images' boxes on a 256 x 320 canvas: nested boxes (a small one inside a larger one), a near-duplicate
    pair with other labels, boxes on the anchor grid, and a thin one; the second image has one box."""
    boxes = [torch.tensor([[20., 30., 180., 200.], [60., 80., 84., 100.], [100., 20., 164., 84.],
                           [102., 21., 165., 86.], [128., 128., 192., 192.], [200., 40., 300., 44.],
                           [8., 150., 40., 250.]]),
             torch.tensor([[40., 40., 140., 120.]])]
    labels = [torch.tensor([0, 1, 2, 3, 4, 0, 2]), torch.tensor([3])]
    return boxes, labels


def test_anchors_equal_mmdets_at_the_papers_canvas(retinanet):
    """201,600 anchors on an 800 x 1344 canvas, in mmdet's order: exactly equal."""
    ours, _, mm_head = retinanet
    sizes = [(-(-800 // s), -(-1344 // s)) for s in ours.strides]
    theirs = torch.cat(mm_head.prior_generator.grid_priors(sizes, device="cpu"))
    mine = ours.all_anchors([torch.zeros(1, 1, h, w) for h, w in sizes])
    assert mine.shape == (201_600, 4) and torch.equal(mine, theirs)


def test_fpn_and_head_outputs_equal_mmdets(retinanet):
    """P3-P7 from mmdet's FPN (P6 from C5, no ReLU before P7) on the normalised stages (mmdet's Swin norms each
    output), and mmdet's RetinaHead on them in its layout: equal within 1e-4 (summation order)."""
    ours, mm_fpn, mm_head = retinanet
    features = swin_features(2, 256, 320, seed=1)
    with torch.no_grad():
        out = ours(features)
        normed = [F.layer_norm(f.permute(0, 2, 3, 1), (f.shape[1],), n.weight, n.bias, n.eps).permute(0, 3, 1, 2)
                  for f, n in zip(features[1:], ours.norms.norms)]
        pyramid = mm_fpn(normed)
        cls_scores, bbox_preds = mm_head(pyramid)
    assert len(pyramid) == len(out["pyramid"]) == 5
    for mine, theirs in zip(out["pyramid"], pyramid):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)
    for mine, theirs in zip(mmdet_layout(out["cls_logits"], out["pyramid"]), cls_scores):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)
    for mine, theirs in zip(mmdet_layout(out["bbox_regression"], out["pyramid"]), bbox_preds):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)


def mmdet_targets(boxes, labels):
    from mmengine.structures import InstanceData
    return [InstanceData(bboxes=b, labels=lab) for b, lab in zip(boxes, labels)]


def test_assignment_and_losses_equal_mmdets(retinanet):
    """Per anchor: label (background = num_classes), label weight (0: ignored) and box target of mmdet's
    ``get_targets`` (MaxIoUAssigner, PseudoSampler, DeltaXYWHBBoxCoder) equal ours exactly (targets within 1e-5),
    the nested and the near-duplicate boxes included; the focal and L1 losses equal mmdet's ``loss_by_feat``
    within 1e-5 relative. Ours averages avg_factor over ranks: one process here, so the same."""
    ours, _, mm_head = retinanet
    boxes, labels = boxes_batch()
    features = swin_features(2, 256, 320, seed=2)
    with torch.no_grad():
        out = ours(features)
    pyramid = out["pyramid"]
    metas = [{"img_shape": (256, 320), "pad_shape": (256, 320), "batch_input_shape": (256, 320)}] * 2
    sizes = [p.shape[-2:] for p in pyramid]
    anchor_list = [mm_head.prior_generator.grid_priors(sizes, device="cpu")] * 2
    valid = [mm_head.prior_generator.valid_flags(sizes, (256, 320), device="cpu")] * 2
    mm_labels, mm_weights, mm_targets, mm_box_weights, _ = mm_head.get_targets(
        anchor_list, valid, mmdet_targets(boxes, labels), metas)[:5]
    mm_labels, mm_weights = torch.cat(mm_labels, dim=1), torch.cat(mm_weights, dim=1)
    mm_targets, mm_box_weights = torch.cat(mm_targets, dim=1), torch.cat(mm_box_weights, dim=1)

    anchors = ours.all_anchors(pyramid)
    padded_boxes, padded_labels = padded_targets(boxes, labels)
    from torchvision.ops import box_iou
    matched = ours.match(box_iou(padded_boxes, anchors), padded_labels >= 0)
    positive = matched >= 0
    box = matched.clamp(min=0)
    my_labels = torch.where(positive, padded_labels.gather(1, box), NUM_CLASSES)
    assert torch.equal(my_labels, mm_labels)
    assert torch.equal((matched != ours.BETWEEN_THRESHOLDS).float(), mm_weights)
    assert torch.equal(positive, mm_box_weights[..., 0] > 0)
    targets = encode_deltas(padded_boxes.gather(1, box[..., None].expand(-1, -1, 4)), anchors)
    torch.testing.assert_close(targets[positive], mm_targets[positive], rtol=1e-5, atol=1e-5)
    for small in (1, 4):  # the box inside a larger one and the near-duplicate: mmdet gives them anchors
        assert int((matched[0] == small).sum()) > 0

    out = {k: (v.clone().requires_grad_() if k != "pyramid" else v) for k, v in out.items()}
    loss, parts = ours.loss(out, {"boxes": boxes, "labels": labels})
    mm_loss = mm_head.loss_by_feat(mmdet_layout(out["cls_logits"], pyramid),
                                   mmdet_layout(out["bbox_regression"], pyramid), mmdet_targets(boxes, labels), metas)
    assert float(parts["focal"]) == pytest.approx(float(sum(mm_loss["loss_cls"])), rel=1e-5)
    assert float(parts["l1"]) == pytest.approx(float(sum(mm_loss["loss_bbox"])), rel=1e-5)


def test_post_processing_equals_mmdets_predict_by_feat(retinanet):
    """The detections of fixed head outputs for a 299 x 401 image resized by 0.642 into a 256 x 320 canvas
    (192 x 257 px: the x and y factors differ): mmdet's ``predict_by_feat`` (nms_pre 1000 per level, score 0.05,
    boxes clipped to the resized image before NMS, zero-size boxes dropped, rescaled per axis, NMS 0.5, 100 kept)
    and ours give the same 100 boxes (within 1e-4 px), scores and labels in the same order; none of ours is
    empty, and all lie in the original image."""
    ours, _, mm_head = retinanet
    features = swin_features(1, 256, 320, seed=3)
    with torch.no_grad():
        out = ours(features)
        g = torch.Generator().manual_seed(4)
        out["cls_logits"] = 2.0 * torch.randn(out["cls_logits"].shape, generator=g) - 2.0
        out["bbox_regression"] = 1.5 * torch.randn(out["bbox_regression"].shape, generator=g)
        mine = ours.predict(out, {"image": torch.zeros(1, 3, 256, 320), "scale": torch.tensor([0.642]),
                                  "orig_size": [(299, 401)]})[0]
        assert resized_extent(299, 401, 0.642) == (192, 257)
        theirs = mm_head.predict_by_feat(
            mmdet_layout(out["cls_logits"], out["pyramid"]), mmdet_layout(out["bbox_regression"], out["pyramid"]),
            batch_img_metas=[{"img_shape": (192, 257), "scale_factor": (257 / 401, 192 / 299),
                              "ori_shape": (299, 401)}], rescale=True)[0]
    assert len(mine["boxes"]) == len(theirs.bboxes) == 100
    torch.testing.assert_close(mine["boxes"], theirs.bboxes, rtol=0, atol=1e-4)
    torch.testing.assert_close(mine["scores"], theirs.scores, rtol=0, atol=1e-6)
    assert torch.equal(mine["labels"], theirs.labels)
    sides = mine["boxes"][:, 2:] - mine["boxes"][:, :2]
    assert (sides > 0).all() and (mine["boxes"][:, 0::2] <= 401 + 1e-4).all()
    assert (mine["boxes"][:, 1::2] <= 299 + 1e-4).all() and (mine["boxes"] >= 0).all()


# ----------------------------------------------------------------------------------------------- UperNet

def mmseg_upernet():
    """mmseg's UPerHead and FCNHead, built from its config (SyncBN as BN: one process), as initialised there."""
    cfg = openmmlab.upernet_swin_t()
    parts = []
    for part in (cfg.model.decode_head, cfg.model.auxiliary_head):
        part = part.copy()
        part.update(num_classes=NUM_CLASSES, norm_cfg=dict(type="BN", requires_grad=True))
        parts.append(openmmlab.build("mmseg", part))
    return parts


def upernet_pairs(ours, mm_decode, mm_aux) -> list[tuple[torch.nn.Module, torch.nn.Module]]:
    """(mmseg's module, ours) for every module that holds parameters, except the feature norms (the backbone's in
    mmseg)."""
    d = ours.decoder

    def conv_bn(theirs, conv, bn):
        return [(theirs.conv, conv), (theirs.bn, bn)]
    pairs = []
    for i in range(4):
        pairs += conv_bn(mm_decode.psp_modules[i][1], d.psp.blocks[i][1][0], d.psp.blocks[i][1][1])
    pairs += conv_bn(mm_decode.bottleneck, d.psp.out_conv[0], d.psp.out_conv[1])
    for j in range(3):  # mmseg lists its laterals from stride 4 up, the decoder from stride 16 down
        lateral, conv = d.fpn_lateral_blocks[2 - j].conv_norm_relu, d.fpn_conv_blocks[2 - j]
        pairs += conv_bn(mm_decode.lateral_convs[j], lateral[0], lateral[1])
        pairs += conv_bn(mm_decode.fpn_convs[j], conv[0], conv[1])
    pairs += conv_bn(mm_decode.fpn_bottleneck, d.fusion_block[0], d.fusion_block[1])
    pairs += [(mm_decode.conv_seg, ours.classifier)]
    pairs += conv_bn(mm_aux.convs[0], ours.aux.conv[0], ours.aux.conv[1])
    return pairs + [(mm_aux.conv_seg, ours.aux.classifier)]


@pytest.fixture
def upernet():
    """(our head, mmseg's UPerHead, mmseg's FCNHead) with our weights copied into mmseg's."""
    mm_decode, mm_aux = mmseg_upernet()
    ours = randomised(UperNetSegmentationHead(SWIN_T, NUM_CLASSES), seed=5)
    for theirs, mine in upernet_pairs(ours, mm_decode, mm_aux):
        copy(theirs, mine)
    return ours, mm_decode, mm_aux


def mmseg_inputs(ours, features):
    """The stages as mmseg's Swin returns them: each through a LayerNorm (eps 1e-5) with our decoder's norm
    weights."""
    return [F.layer_norm(f.permute(0, 2, 3, 1), (f.shape[1],), n.weight, n.bias, 1e-5).permute(0, 3, 1, 2)
            for f, n in zip(features, ours.decoder.feature_norms)]


@pytest.mark.parametrize("training", [True, False])
def test_upernet_logits_equal_mmsegs(upernet, training):
    """Main logits (and, training, the auxiliary logits on the normalised stage 3) equal mmseg's UPerHead and
    FCNHead within 1e-4, each Dropout2d(0.1) drawing the same mask from the same seed; training BN uses the
    batch's statistics on both sides."""
    ours, mm_decode, mm_aux = upernet
    features = swin_features(2, 128, 128, seed=6)
    for module in (ours, mm_decode, mm_aux):
        module.train(training)
    with torch.no_grad():
        torch.manual_seed(7)
        out = ours(features)
        inputs = mmseg_inputs(ours, features)
        torch.manual_seed(7)
        theirs = mm_decode(inputs)
        torch.manual_seed(8)
        mm_aux_logits = mm_aux(inputs)
        if training:
            torch.manual_seed(8)
            aux = ours.aux(ours.decoder.feature_norms[2](features[2]))
            torch.testing.assert_close(aux, mm_aux_logits, rtol=1e-4, atol=1e-4)
    assert ("aux" in out) == training
    torch.testing.assert_close(out["logits"], theirs, rtol=1e-4, atol=1e-4)


def test_segmentation_loss_equals_mmsegs_main_plus_auxiliary(upernet):
    """Cross-entropy of both heads' logits against a mask with ignored pixels, mmseg's ``loss_by_feat``
    (``avg_non_ignore=False``: divided by every pixel) for the main head plus 0.4 times the auxiliary's: equal
    within 1e-5 relative."""
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    ours, mm_decode, mm_aux = upernet
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(2, NUM_CLASSES, 32, 32, generator=g)
    aux = torch.randn(2, NUM_CLASSES, 8, 8, generator=g)
    mask = torch.randint(0, NUM_CLASSES, (2, 128, 128), generator=g)
    mask[:, :40] = 255  # mmseg's ignore_index
    loss, parts = ours.loss({"logits": logits, "aux": aux}, {"mask": mask})
    samples = []
    for m in mask:
        sample = SegDataSample()
        sample.gt_sem_seg = PixelData(data=m[None])
        samples.append(sample)
    main = mm_decode.loss_by_feat(logits, samples)["loss_ce"]
    auxiliary = mm_aux.loss_by_feat(aux, samples)["loss_ce"]  # its config weighs it 0.4
    assert float(parts["ce"]) == pytest.approx(float(main), rel=1e-5)
    assert float(loss) == pytest.approx(float(main + auxiliary), rel=1e-5)
    labelled_mean = F.cross_entropy(F.interpolate(logits, size=(128, 128), mode="bilinear"), mask, ignore_index=255)
    assert float(parts["ce"]) < 0.8 * float(labelled_mean)  # 40 of 128 rows ignored: not the mean over labelled


def test_label_map_from_the_same_logits_equals_mmsegs_postprocess(upernet):
    """An image of 300 x 400 resized by 0.32 into a 128 x 128 canvas (padding right and bottom): logits at
    stride 4 resized to the canvas, the padding cut, resized to the original, argmax, by our ``predict`` and by
    mmseg's decode head ``predict_by_feat`` and segmentor ``postprocess_result``: the same label on every pixel.
    (The input's resize differs on purpose: ``evaluation.py``.)"""
    from mmseg.models.segmentors.base import BaseSegmentor
    from mmseg.structures import SegDataSample
    ours, mm_decode, _ = upernet
    g = torch.Generator().manual_seed(10)
    logits = torch.randn(1, NUM_CLASSES, 32, 32, generator=g)
    mine = ours.predict({"logits": logits}, {"image": torch.zeros(1, 3, 128, 128), "scale": torch.tensor([0.32]),
                                             "orig_size": [(300, 400)]})[0]
    extent = (96, 128)
    meta = {"img_shape": (128, 128), "ori_shape": (300, 400), "padding_size": [0, 128 - extent[1], 0, 128 - extent[0]]}
    resized = mm_decode.predict_by_feat(logits, [meta])
    sample = SegDataSample(metainfo=meta)
    segmentor = SimpleNamespace(align_corners=False)  # all its postprocess reads of a segmentor of many classes
    theirs = BaseSegmentor.postprocess_result(segmentor, resized, [sample])[0].pred_sem_seg.data[0]
    assert mine.shape == theirs.shape == (300, 400)
    assert torch.equal(mine, theirs)


def test_training_crop_redraws_as_mmsegs_random_crop_with_cat_max_ratio():
    """``crop_origin`` and mmseg's ``RandomCrop(crop_size, cat_max_ratio=0.75)`` (the ADE20K config's), given the
    same draws (ours through a generator that reads numpy's global one, as mmseg draws): the same crop for each of
    40 seeds, on a class map mostly of one class with ignored pixels; for most seeds the first draw was refused."""
    from mmseg.datasets.transforms import RandomCrop

    from mthl_ds.data.pipelines import crop_origin
    cfg = openmmlab.upernet_swin_t()
    crop = next(t for t in cfg.train_pipeline if t["type"] == "RandomCrop")
    assert crop["cat_max_ratio"] == 0.75
    theirs_crop = RandomCrop(crop_size=(64, 64), cat_max_ratio=crop["cat_max_ratio"])
    classes = np.full((160, 200), 3, dtype=np.int64)
    classes[:40, :50] = 7
    classes[120:, 150:] = 9
    classes[60:100, :] = 255
    numpy_draws = SimpleNamespace(integers=lambda low, high: np.random.randint(low, high))
    redrawn = 0
    for seed in range(40):
        np.random.seed(seed)
        first = (np.random.randint(0, 97), np.random.randint(0, 137))
        np.random.seed(seed)
        mine = crop_origin(numpy_draws, classes, 64, 64)
        np.random.seed(seed)
        y1, _, x1, _ = theirs_crop.crop_bbox({"img": np.zeros((160, 200, 3), np.uint8), "gt_seg_map": classes})
        assert mine == (y1, x1), seed
        redrawn += mine != first
    assert redrawn > 20


def test_photometric_distortion_draws_as_mmsegs_and_lands_within_a_few_levels():
    """``photometric_distortion`` and mmseg's ``PhotoMetricDistortion`` (in the ADE20K config's training
    pipeline), given the same draws, on a random image over 40 seeds: equal where no step went through HSV;
    otherwise the HSV round trip (float here, fixed point in OpenCV) keeps them within 3 levels on 99% of the
    values, 0.75 on average."""
    from mmseg.datasets.transforms import PhotoMetricDistortion

    from mthl_ds.data.pipelines import photometric_distortion
    cfg = openmmlab.upernet_swin_t()
    assert any(t["type"] == "PhotoMetricDistortion" for t in cfg.train_pipeline)
    img = np.random.default_rng(0).integers(0, 256, (64, 80, 3)).astype(np.uint8)
    numpy_draws = SimpleNamespace(integers=lambda *bounds: np.random.randint(*bounds),
                                  uniform=lambda low, high: np.random.uniform(low, high))
    exact = 0
    for seed in range(40):
        np.random.seed(seed)
        theirs = PhotoMetricDistortion().transform({"img": img[..., ::-1].copy()})["img"][..., ::-1]  # BGR there
        np.random.seed(seed)
        mine = photometric_distortion(numpy_draws, img)
        diff = np.abs(mine.astype(np.int64) - theirs)
        exact += int(diff.max() == 0)
        assert np.percentile(diff, 99) <= 3 and diff.mean() <= 0.75, seed
    assert 5 <= exact < 40  # some seeds took no HSV step (then equal), most did


def assert_initialised_alike(pairs) -> int:
    """Each parameter of ours drawn as its counterpart in mmdet / mmseg: constants (biases, norms) equal; random
    weights with the same spread (std within 10%) and the same law (the share within one std: 0.68 normal, 0.58
    uniform; within 0.06). Returns how many random tensors were compared."""
    compared = 0
    for theirs, mine in pairs:
        own = dict(mine.named_parameters())
        for name, t in theirs.named_parameters():
            m = own[name].detach()
            assert m.shape == t.shape, name
            if t.std() == 0:
                assert torch.equal(m, t), (type(theirs).__name__, name)
                continue
            share = [(x.abs() <= x.std()).double().mean().item() for x in (m, t)]
            assert abs(m.std() / t.std() - 1) < 0.1, (type(theirs).__name__, name, m.std(), t.std())
            assert abs(share[0] - share[1]) < 0.06, (type(theirs).__name__, name, share)
            compared += 1
    return compared


def test_initialisation_draws_as_mmdets_and_mmsegs():
    """A fresh head's parameters against mmdet's and mmseg's parts after their ``init_weights()``: the FPN
    Xavier uniform, the RetinaNet subnets normal(0, 0.01) with the prior bias; UperNet's and the FCN head's
    conv-BN-ReLUs as mmcv's ``ConvModule`` (kaiming normal over the fan-out), the classifiers normal(0, 0.01)."""
    torch.manual_seed(0)
    mm_fpn, mm_head = mmdet_retinanet()
    mm_decode, mm_aux = mmseg_upernet()
    for part in (mm_fpn, mm_head, mm_decode, mm_aux):
        part.init_weights()
    detection = assert_initialised_alike(retinanet_pairs(RetinaNetDetectionHead(SWIN_T, NUM_CLASSES), mm_fpn, mm_head))
    segmentation = assert_initialised_alike(upernet_pairs(UperNetSegmentationHead(SWIN_T, NUM_CLASSES), mm_decode,
                                                          mm_aux))
    assert (detection, segmentation) == (18, 15)


def test_random_rescale_sizes_equal_mmsegs_random_resize():
    """``random_rescale`` and mmseg's ``RandomResize`` (the ADE20K config's: scale (2048, 512), ratios 0.5-2.0),
    given the same draw, over 300 image sizes up to 1:6: the same resized (h, w) for every one. Taking the short
    side x ratio without truncation or the long bound (as before) gives other sizes for some."""
    from mmseg.registry import TRANSFORMS

    from mthl_ds.data.pipelines import random_rescale
    cfg = openmmlab.upernet_swin_t()
    resize_cfg = next(t for t in cfg.train_pipeline if t["type"] == "RandomResize")
    assert tuple(resize_cfg["scale"]) == (2048, 512)
    theirs_resize = TRANSFORMS.build(resize_cfg)
    numpy_draws = SimpleNamespace(uniform=lambda low, high: np.random.uniform(low, high))
    sizes = np.random.default_rng(0).integers(64, 1200, size=(300, 2))
    sizes[::10, 1] = sizes[::10, 0] * 6  # panoramas, where the long bound binds
    untruncated = 0
    for seed, (h, w) in enumerate(sizes.tolist()):
        np.random.seed(seed)
        mine = random_rescale(numpy_draws, h, w, 512, tuple(resize_cfg["ratio_range"]))
        np.random.seed(seed)
        theirs = theirs_resize.transform({"img": np.zeros((h, w, 3), np.uint8)})["img"].shape[:2]
        assert mine == theirs, (h, w, seed)
        np.random.seed(seed)
        untruncated += resized_extent(h, w, 512 * np.random.uniform(0.5, 2.0) / min(h, w)) != mine
    assert untruncated > 30


def test_resizes_equal_opencvs_as_mmcv_calls_them():
    """``resize_bilinear`` and ``resize_nearest`` against ``cv2.resize`` (INTER_LINEAR for images, INTER_NEAREST
    for label maps, as mmcv's ``imresize`` calls it for mmdet's and mmseg's ``Resize``), over 100 random sizes,
    shrinking and enlarging: images within one level (OpenCV rounds in fixed point), under 0.2 on average
    (measured: 0.13); label maps equal. PIL's bilinear, which antialiases when it shrinks, is more than 5 levels
    off on average (measured: 12.7)."""
    import cv2
    from PIL import Image

    from mthl_ds.data.images import resize_bilinear, resize_nearest
    rng = np.random.default_rng(0)
    ours, pil = [], []
    for _ in range(100):
        (h, w), (new_h, new_w) = rng.integers(8, 300, 2).tolist(), rng.integers(4, 400, 2).tolist()
        img = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
        theirs = cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_LINEAR).astype(np.int64)
        diff = np.abs(resize_bilinear(img, new_h, new_w) - theirs)
        assert diff.max() <= 1, (h, w, new_h, new_w)
        ours.append(diff.mean())
        pil.append(np.abs(np.asarray(Image.fromarray(img).resize((new_w, new_h), Image.BILINEAR)) - theirs).mean())
        labels = rng.integers(0, 151, (h, w)).astype(np.uint8)
        assert np.array_equal(resize_nearest(labels, new_h, new_w),
                              cv2.resize(labels, (new_w, new_h), interpolation=cv2.INTER_NEAREST)), (h, w, new_h, new_w)
    assert np.mean(ours) < 0.2 and np.mean(pil) > 5

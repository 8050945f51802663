"""Task heads on the backbone's four stage features (strides 4, 8, 16, 32). Each head has
``forward(features)``, ``loss(output, batch, reduce_mean=None) -> (loss, {name: value})`` and
``predict(output, batch)``; ``reduce_mean`` averages a device tensor over the data-parallel ranks (only the
detection loss's normaliser needs one). A loss's parts are detached 0-dim tensors on the loss's device, and no loss
reads a tensor's value on the host or takes a shape from one, so a training step on CUDA does not wait for the
device here (``tests/test_heads_static.py`` checks this on fake CUDA tensors).

Classification: a linear layer on pooled, normalised last-stage features. Detection: mmdet's RetinaNet
(``retinanet_swin-t-p4-w7_fpn_1x_coco``) from torchvision's parts: FPN P3-P5 on stages 2-4 with P6 and P7 from
stage 4, ``RetinaNetHead``, mmdet's anchors, assignment, focal + L1 losses and post-processing. Segmentation:
mmseg's UperNet (``segmentation_models_pytorch``'s ``UPerNetDecoder``, block for block mmseg's ``UPerHead``) and
its FCN auxiliary head on stage 3. ``tests/test_oracle.py`` compares these with mmdet's and mmseg's own code.

Both dense heads normalise each stage feature they take, as mmdet's and mmseg's Swin backbones do to each output
they return (``norm{i}``; timm's ``forward_intermediates`` returns the stages as they are): the detection head
with its :class:`FeatureNorms`, UperNet with its decoder's own ``feature_norms``. ``layout="torchvision"`` builds
the detection head of exports and checkpoints written before that (no feature norms; P6 from P5 with a ReLU
before P7, torchvision's ``LastLevelP6P7``): a stored recipe without ``head_layout`` is read as that layout
(``mthl_ds.config.recipe_from_dict``).
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from segmentation_models_pytorch.decoders.upernet.decoder import UPerNetDecoder
from torch import Tensor, nn
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops import batched_nms, box_iou, sigmoid_focal_loss
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, FeaturePyramidNetwork, LastLevelP6P7

from mthl_ds.geometry import IGNORE_INDEX, axis_scales, resized_extent
from mthl_ds.runtime.collectives import distributed, sum_over_ranks, world


class ClassificationHead(nn.Module):
    def __init__(self, stage_channels: Sequence[int], num_classes: int):
        super().__init__()
        self.norm = nn.LayerNorm(stage_channels[-1])
        self.fc = nn.Linear(stage_channels[-1], num_classes)

    def forward(self, features: list[Tensor]) -> Tensor:
        return self.fc(self.norm(features[-1].mean(dim=(2, 3))))

    def loss(self, logits: Tensor, batch: dict, reduce_mean=None) -> tuple[Tensor, dict]:
        loss = F.cross_entropy(logits.float(), batch["label"])
        return loss, {"ce": loss.detach()}

    def predict(self, logits: Tensor, batch: dict) -> Tensor:
        return logits.float()


LAYOUTS = ("openmmlab", "torchvision")


def xavier_convs(module: nn.Module) -> nn.Module:
    """mmdet's FPN initialisation (``init_cfg=dict(type="Xavier", layer="Conv2d", distribution="uniform")``):
    every conv Xavier uniform, bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return module


def kaiming_fan_out_convs(module: nn.Module) -> nn.Module:
    """mmcv's ``ConvModule`` initialisation, which every conv-norm-ReLU of mmseg's UPerHead and FCNHead gets:
    each conv kaiming normal over its fan-out for a ReLU, bias 0 (the norms start at weight 1, bias 0, as
    PyTorch's)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return module


class FeatureNorms(nn.Module):
    """A LayerNorm over the channels of each NCHW stage feature, as mmdet's Swin normalises each output it returns
    (``norm{i}``). One set per head, as each of those single-task models has its own."""

    def __init__(self, channels: Sequence[int]):
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(c) for c in channels)

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        return [norm(f.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).contiguous() for norm, f in zip(self.norms, features)]


class RetinaExtraLevels(ExtraFPNBlock):
    """mmdet's RetinaNet extra levels (``FPN(add_extra_convs="on_input")``): P6 is a 3x3 stride-2 conv of the
    last stage's feature (C5, not P5) and P7 one of P6, with no ReLU between (``relu_before_extra_convs=False``).
    Parameters named as torchvision's ``LastLevelP6P7``'s; initialised by the head (:func:`xavier_convs`)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.p6 = nn.Conv2d(in_channels, out_channels, 3, 2, 1)
        self.p7 = nn.Conv2d(out_channels, out_channels, 3, 2, 1)

    def forward(self, results: list[Tensor], x: list[Tensor], names: list[str]) -> tuple[list[Tensor], list[str]]:
        p6 = self.p6(x[-1])
        return [*results, p6, self.p7(p6)], [*names, "p6", "p7"]


def retina_cell_anchors(stride: int, octave_scale: float = 4.0, scales_per_octave: int = 3,
                        ratios: Sequence[float] = (0.5, 1.0, 2.0)) -> Tensor:
    """mmdet's RetinaNet anchors of one level centred on (0, 0), (ratios x scales, 4) xyxy: side
    ``stride * 4 * 2^(i/3)``, height / width = ratio. torchvision's ``AnchorGenerator`` rounds them to whole pixels;
    mmdet does not, nor does this."""
    scales = octave_scale * 2.0 ** (torch.arange(scales_per_octave, dtype=torch.float64) / scales_per_octave)
    h_ratios = torch.tensor(ratios, dtype=torch.float64).sqrt()
    ws = (stride / h_ratios[:, None] * scales[None, :]).flatten()
    hs = (stride * h_ratios[:, None] * scales[None, :]).flatten()
    return torch.stack([-ws / 2, -hs / 2, ws / 2, hs / 2], dim=1).float()


def level_anchors(cell: Tensor, stride: int, height: int, width: int) -> Tensor:
    """``cell`` anchors at every position of a (height, width) level, position-major: (H * W * A, 4)."""
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float32) * stride,
                            torch.arange(width, dtype=torch.float32) * stride, indexing="ij")
    shifts = torch.stack([xs, ys, xs, ys], dim=-1).reshape(-1, 1, 4)
    return (shifts + cell.view(1, -1, 4)).reshape(-1, 4)


def encode_deltas(gt: Tensor, anchors: Tensor) -> Tensor:
    """mmdet's ``DeltaXYWHBBoxCoder`` (means 0, stds 1) encoding over any leading dims: torchvision's
    ``BoxCoder(weights=(1, 1, 1, 1)).encode_single`` arithmetic, without its host-to-device copy of the weights
    in every call."""
    ex_w, ex_h = anchors[..., 2] - anchors[..., 0], anchors[..., 3] - anchors[..., 1]
    ex_x, ex_y = anchors[..., 0] + 0.5 * ex_w, anchors[..., 1] + 0.5 * ex_h
    gt_w, gt_h = gt[..., 2] - gt[..., 0], gt[..., 3] - gt[..., 1]
    gt_x, gt_y = gt[..., 0] + 0.5 * gt_w, gt[..., 1] + 0.5 * gt_h
    return torch.stack([(gt_x - ex_x) / ex_w, (gt_y - ex_y) / ex_h, torch.log(gt_w / ex_w), torch.log(gt_h / ex_h)],
                       dim=-1)


WH_DELTA_CLIP = abs(math.log(16 / 1000))  # mmdet's wh_ratio_clip


def decode_deltas(deltas: Tensor, anchors: Tensor, height: int, width: int) -> Tensor:
    """mmdet's ``delta2bbox`` (means 0, stds 1): width and height deltas clamped on both sides to +-log(1000 / 16)
    (torchvision clamps only above), boxes clipped to the (height, width) image."""
    size = anchors[:, 2:] - anchors[:, :2]
    centre = (anchors[:, :2] + anchors[:, 2:]) * 0.5 + size * deltas[:, :2]
    half = size * deltas[:, 2:].clamp(-WH_DELTA_CLIP, WH_DELTA_CLIP).exp() * 0.5
    boxes = torch.cat([centre - half, centre + half], dim=1)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    return boxes


def padded_targets(boxes: Sequence[Tensor], labels: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Every image's boxes and labels padded to the batch's most boxes (at least one): (B, G, 4) zeros and (B, G)
    with label -1 marking padding. The size comes from the tensors' shapes, not their values."""
    size = max([1, *map(len, boxes)])
    return (torch.stack([F.pad(b, (0, 0, 0, size - len(b))) for b in boxes]),
            torch.stack([F.pad(lab, (0, size - len(lab)), value=-1) for lab in labels]))


class RetinaNetDetectionHead(nn.Module):
    """mmdet's RetinaNet on stages 2-4: feature norms, FPN P3-P7 (:class:`RetinaExtraLevels`), the RetinaNet
    subnets. Anchors: 3 scales x 3 ratios per level, base size 4 x stride, placed at the fixed strides 8-128 as
    mmdet places them (torchvision's generator derives each stride as canvas size // level size, 61 and 114 px
    instead of 64 and 128 on an 800 x 1344 canvas), always in float32, built once per device and level shapes.
    ``loss`` and ``predict`` are mmdet's (see there). Initialised as mmdet's: the FPN Xavier uniform, the subnets
    normal(0, 0.01) with the classifier's prior bias (torchvision's ``RetinaNetHead`` does the same)."""

    strides = (8, 16, 32, 64, 128)
    BELOW_LOW_THRESHOLD = -1  # an anchor's match: background
    BETWEEN_THRESHOLDS = -2  # ignored (IoU between the thresholds)

    def __init__(self, stage_channels: Sequence[int], num_classes: int, fpn_channels: int = 256,
                 score_thresh: float = 0.05, nms_thresh: float = 0.5, detections_per_img: int = 100,
                 topk_candidates: int = 1000, layout: str = "openmmlab"):
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"unknown head layout {layout!r}; choose from {LAYOUTS}")
        self.norms = FeatureNorms(stage_channels[1:]) if layout == "openmmlab" else None
        extra = (RetinaExtraLevels(stage_channels[-1], fpn_channels) if layout == "openmmlab"
                 else LastLevelP6P7(fpn_channels, fpn_channels))
        self.fpn = FeaturePyramidNetwork(list(stage_channels[1:]), fpn_channels, extra_blocks=extra)
        if layout == "openmmlab":
            xavier_convs(self.fpn)
        self.cell_anchors = [retina_cell_anchors(s) for s in self.strides]
        self.num_anchors = len(self.cell_anchors[0])
        self.anchor_cache: dict = {}  # (device, level shapes) -> every level's anchors; not state
        self.head = RetinaNetHead(fpn_channels, self.num_anchors, num_classes)
        self.high_threshold, self.low_threshold = 0.5, 0.4  # IoU: positive at or above, ignored in between
        self.score_thresh, self.nms_thresh = score_thresh, nms_thresh
        self.detections_per_img, self.topk_candidates = detections_per_img, topk_candidates

    def forward(self, features: list[Tensor]) -> dict:
        stages = self.norms(features[1:]) if self.norms is not None else features[1:]
        pyramid = list(self.fpn({str(i): f for i, f in enumerate(stages)}).values())
        return {**self.head(pyramid), "pyramid": pyramid}

    def all_anchors(self, pyramid: list[Tensor]) -> Tensor:
        """Every level's anchors concatenated (position-major within a level), on the pyramid's device. Built on
        the CPU and copied once per (device, level shapes), not in every step; the last 8 such keys are kept."""
        key = (pyramid[0].device, tuple(tuple(p.shape[-2:]) for p in pyramid))
        if key not in self.anchor_cache:
            while len(self.anchor_cache) >= 8:
                self.anchor_cache.pop(next(iter(self.anchor_cache)))
            self.anchor_cache[key] = torch.cat([level_anchors(cell, stride, *shape) for cell, stride, shape
                                                in zip(self.cell_anchors, self.strides, key[1])]).to(key[0])
        return self.anchor_cache[key]

    def level_anchors(self, pyramid: list[Tensor]) -> list[Tensor]:
        """Each level's anchors (views of :meth:`all_anchors`)."""
        return list(self.all_anchors(pyramid).split([h * w * self.num_anchors for h, w in
                                                     (p.shape[-2:] for p in pyramid)]))

    def anchors(self, images: Tensor, pyramid: list[Tensor]) -> list[Tensor]:
        """Every image's anchors (all levels concatenated); every image of a batch shares the canvas."""
        return [self.all_anchors(pyramid)] * images.shape[0]

    def match(self, iou: Tensor, valid: Tensor) -> Tensor:
        """mmdet's ``MaxIoUAssigner(pos_iou_thr=0.5, neg_iou_thr=0.4, min_pos_iou=0)`` on a batch, with static
        shapes: ``iou`` (B, G, N) between padded boxes and anchors, ``valid`` (B, G) the real boxes. Returns (B, N):
        each anchor's box, or ``BELOW_LOW_THRESHOLD`` (best IoU under 0.4, or no box) or ``BETWEEN_THRESHOLDS``.
        Then every box takes all the anchors it overlaps most (``gt_max_assign_all``, ties included, even at IoU
        0), whatever box those anchors overlap most, the box listed last winning an anchor several boxes share,
        as mmdet's loop over the boxes leaves it (torchvision's ``Matcher`` gives such an anchor to the box it
        overlaps most, and a small box inside a larger one can end with no anchor)."""
        iou = torch.where(valid[..., None], iou, -1.0)
        best, all_matches = iou.max(dim=1)  # ties: the first box, as mmdet's argmax over its gt rows
        matches = torch.where(best < self.low_threshold, self.BELOW_LOW_THRESHOLD,
                              torch.where(best < self.high_threshold, self.BETWEEN_THRESHOLDS, all_matches))
        highest = iou.max(dim=2, keepdim=True).values  # each box's best IoU over the anchors
        order = torch.arange(1, iou.shape[1] + 1, device=iou.device).view(1, -1, 1)
        last = torch.where((iou == highest) & valid[..., None], order, 0).max(dim=1).values  # 1 + box, 0: none
        return torch.where(last > 0, last - 1, matches)

    def loss(self, output: dict, batch: dict, reduce_mean: Optional[Callable[[Tensor], Tensor]] = None
             ) -> tuple[Tensor, dict]:
        """mmdet's RetinaNet loss: focal loss (alpha 0.25, gamma 2) over every anchor that is not ignored (IoU
        between 0.4 and 0.5) and L1 on the positives' box deltas, both summed over the batch and divided by one
        ``avg_factor``: the batch's positive anchors, each image counting at least one (mmdet's
        ``num_total_pos``), averaged over the data-parallel ranks when ``reduce_mean`` is given (as mmdet's
        FCOS / ATSS heads average theirs; its RetinaNet head keeps each GPU's own count), so the loss and its
        gradient do not depend on the number of ranks. torchvision's ``compute_loss`` instead divides each
        image's loss by that image's own positives.

        Static shapes, no host sync: boxes are padded to the batch's most boxes, every term is computed for every
        anchor and masked. ``parts["positives"]`` is this rank's count (float)."""
        cls_logits, deltas = output["cls_logits"].float(), output["bbox_regression"].float()
        anchors = self.all_anchors(output["pyramid"])
        boxes, labels = padded_targets(batch["boxes"], batch["labels"])
        matched = self.match(box_iou(boxes, anchors), labels >= 0)
        foreground = (matched >= 0)[..., None]
        scored = (matched != self.BETWEEN_THRESHOLDS)[..., None]
        box = matched.clamp(min=0)  # background anchors read box 0 (or padding) and are masked out
        target = torch.zeros_like(cls_logits).scatter_(2, labels.gather(1, box).clamp(min=0)[..., None],
                                                       foreground.to(cls_logits.dtype))
        focal = torch.where(scored, sigmoid_focal_loss(cls_logits, target), 0.0).sum()
        gt = torch.where(foreground, boxes.gather(1, box[..., None].expand(-1, -1, 4)), anchors)  # finite deltas
        l1 = torch.where(foreground, (deltas - encode_deltas(gt, anchors)).abs(), 0.0).sum()
        positives = foreground.sum(dim=(1, 2)).clamp(min=1).sum().to(cls_logits.dtype)
        avg_factor = (reduce_mean(positives) if reduce_mean is not None else positives).clamp(min=1.0)
        focal, l1 = focal / avg_factor, l1 / avg_factor
        return focal + l1, {"focal": focal.detach(), "l1": l1.detach(), "positives": positives}

    @torch.no_grad()
    def predict(self, output: dict, batch: dict) -> list[dict]:
        """Detections per image in the *original* image's pixels (boxes xyxy, scores, contiguous labels), on the
        model's device; ``batch["scale"]`` and ``batch["orig_size"]`` are read on the host. mmdet's
        ``predict_by_feat``: per level, the ``topk_candidates`` best (anchor, class) scores above ``score_thresh``;
        their boxes decoded and clipped to the resized image (not the padded canvas), scaled back to the original
        image (each axis by its own factor, :func:`mthl_ds.geometry.axis_scales`), those of zero width or height
        dropped; class-wise NMS; the ``detections_per_img`` best."""
        pyramid = output["pyramid"]
        per_level = [p.shape[-2] * p.shape[-1] * self.num_anchors for p in pyramid]
        logits = output["cls_logits"].float().split(per_level, dim=1)
        deltas = output["bbox_regression"].float().split(per_level, dim=1)
        anchors = self.level_anchors(pyramid)
        detections = []
        for i, (scale, (height, width)) in enumerate(zip(batch["scale"].tolist(), batch["orig_size"])):
            extent = resized_extent(height, width, scale)
            boxes, scores, labels = [], [], []
            for level_logits, level_deltas, level_anchors in zip(logits, deltas, anchors):
                level_scores = level_logits[i].sigmoid().flatten()
                candidates = torch.nonzero(level_scores > self.score_thresh).squeeze(1)
                level_scores, order = level_scores[candidates].sort(descending=True)
                candidates = candidates[order[:self.topk_candidates]]
                anchor, label = candidates // level_logits.shape[-1], candidates % level_logits.shape[-1]
                boxes.append(decode_deltas(level_deltas[i, anchor], level_anchors[anchor], *extent))
                scores.append(level_scores[:self.topk_candidates])
                labels.append(label)
            factors = torch.tensor(axis_scales(height, width, scale) * 2, device=logits[0].device)
            boxes, scores, labels = torch.cat(boxes) / factors, torch.cat(scores), torch.cat(labels)
            sized = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # mmdet's min_bbox_size=0
            boxes, scores, labels = boxes[sized], scores[sized], labels[sized]
            keep = batched_nms(boxes, scores, labels, self.nms_thresh)[:self.detections_per_img]
            detections.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
        return detections


def segmentation_classifier(channels: int, num_classes: int) -> nn.Conv2d:
    """mmseg's ``conv_seg``: a 1x1 conv, initialised normal(0, 0.01) with bias 0 (``BaseDecodeHead``'s
    ``init_cfg``)."""
    conv = nn.Conv2d(channels, num_classes, kernel_size=1)
    nn.init.normal_(conv.weight, std=0.01)
    nn.init.constant_(conv.bias, 0)
    return conv


class FCNAuxHead(nn.Module):
    """mmseg's auxiliary FCN head: one 3x3 conv-BN-ReLU, then ``Dropout2d(0.1)`` and a 1x1 classifier."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256):
        super().__init__()
        self.conv = kaiming_fan_out_convs(nn.Sequential(nn.Conv2d(in_channels, channels, 3, padding=1, bias=False),
                                                        nn.BatchNorm2d(channels), nn.ReLU(inplace=True)))
        self.dropout = nn.Dropout2d(0.1)
        self.classifier = segmentation_classifier(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.dropout(self.conv(x)))


class UperNetSegmentationHead(nn.Module):
    """mmseg's UperNet: the UperNet decoder (feature norms, PPM + FPN fusion at stride 4), ``Dropout2d(0.1)`` and
    a 1x1 classifier; the optional FCN auxiliary head on stage 3 as the decoder normalises it (mmseg's aux head
    reads the backbone's ``norm2`` output, which its decode head reads too). Every conv-BN-ReLU initialised as
    mmcv's ``ConvModule`` (:func:`kaiming_fan_out_convs`), the classifiers as mmseg's ``conv_seg``.

    Args:
        aux_weight: weight of the auxiliary head's loss (mmseg: 0.4); 0 builds no auxiliary head.
    """

    def __init__(self, stage_channels: Sequence[int], num_classes: int, channels: int = 512, aux_weight: float = 0.4):
        super().__init__()
        # UPerNetDecoder skips the stride-1 and stride-2 entries of its input list and normalises the others.
        self.decoder = kaiming_fan_out_convs(UPerNetDecoder([3, 0, *stage_channels], encoder_depth=5,
                                                            decoder_channels=channels))
        self.dropout = nn.Dropout2d(0.1)
        self.classifier = segmentation_classifier(channels, num_classes)
        self.aux_weight = aux_weight
        self.aux = FCNAuxHead(stage_channels[2], num_classes, channels // 2) if aux_weight > 0 else None

    def forward(self, features: list[Tensor]) -> dict:
        skipped = features[0].new_empty(0)  # the decoder skips the stride-1 and stride-2 entries
        out = {"logits": self.classifier(self.dropout(self.decoder([skipped, skipped, *features])))}
        if self.aux is not None and self.training:
            out["aux"] = self.aux(self.decoder.feature_norms[2](features[2]))
        return out

    def loss(self, output: dict, batch: dict, reduce_mean=None) -> tuple[Tensor, dict]:
        """mmseg's: cross-entropy of the logits resized to the mask, summed over the labelled pixels and divided
        by all of them (``avg_non_ignore=False``, mmseg's default), plus ``aux_weight`` times the same for the
        auxiliary logits."""
        mask = batch["mask"]
        ce = lambda logits: F.cross_entropy(  # noqa: E731
            F.interpolate(logits.float(), size=mask.shape[-2:], mode="bilinear", align_corners=False), mask,
            ignore_index=IGNORE_INDEX, reduction="sum") / mask.numel()
        main = ce(output["logits"])
        logs = {"ce": main.detach()}
        if "aux" in output:
            aux = ce(output["aux"])
            logs["aux_ce"] = aux.detach()
            main = main + self.aux_weight * aux
        return main, logs

    @torch.no_grad()
    def predict(self, output: dict, batch: dict) -> Tensor | list[Tensor]:
        """Class per pixel of the canvas (B, H, W); with ``batch["orig_size"]`` (and ``scale``), per image at its
        original size: the logits of its part of the canvas resized back (bilinear), then argmax (mmseg)."""
        canvas = batch["image"].shape[-2:]
        logits = F.interpolate(output["logits"].float(), size=canvas, mode="bilinear", align_corners=False)
        if "orig_size" not in batch:
            return logits.argmax(1)
        masks = []
        for image_logits, scale, (h, w) in zip(logits, batch["scale"].tolist(), batch["orig_size"]):
            part_h, part_w = resized_extent(h, w, scale)
            part = image_logits[:, :part_h, :part_w]
            masks.append(resized_argmax(part, (h, w)))
        return masks


def source_rows(out_size: int, in_size: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Bilinear (align_corners=False) resampling of one axis as PyTorch computes it: for each output index, the
    two source indices and their weights (lower index, upper index, lower weight, upper weight)."""
    scale = float(torch.tensor(in_size / out_size, dtype=torch.float32))  # PyTorch's scale is a float32
    real = (scale * (torch.arange(out_size, dtype=torch.float64, device=device) + 0.5) - 0.5).float().clamp(min=0)
    low = real.floor().long().clamp(max=in_size - 1)
    upper = (real - low).clamp(0, 1)
    return low, (low + 1).clamp(max=in_size - 1), 1 - upper, upper


def resized_argmax(logits: Tensor, size: tuple[int, int], max_elements: int = 1 << 24) -> Tensor:
    """``F.interpolate(logits[None], size, mode="bilinear").argmax(1)[0]`` for ``logits`` [C, h, w], computed in
    bands of output rows of at most ``max_elements`` resized logits each: a 24-megapixel photo through a
    150-class head would otherwise hold 14 GB of resized logits. Each band resizes the source rows it needs
    across (PyTorch's own kernel; rows kept as they are), then blends them down with PyTorch's row weights, in
    the order PyTorch's bilinear kernel sums: the labels are those of the whole-image resize, except where two
    classes tie within one float32 rounding (2 pixels in 24 million, random 150-class logits)."""
    channels, in_h, in_w = logits.shape
    height, width = size
    logits = logits.float()
    y0, y1, wy0, wy1 = source_rows(height, in_h, logits.device)
    low, high = y0.tolist(), y1.tolist()  # host copies of the row indices: one transfer, not one per band
    mask = torch.empty((height, width), dtype=torch.long, device=logits.device)
    band = max(1, max_elements // max(1, channels * width))
    for start in range(0, height, band):
        stop = min(height, start + band)
        first, last = low[start], high[stop - 1] + 1  # the source rows this band blends
        across = F.interpolate(logits[None, :, first:last], size=(last - first, width), mode="bilinear",
                               align_corners=False)[0]  # [C, rows, width]: each row resized across only
        rows = slice(start, stop)
        resized = across[:, y0[rows] - first] * wy0[rows, None] + across[:, y1[rows] - first] * wy1[rows, None]
        mask[rows] = resized.argmax(0)
    return mask


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm over the whole batch of every rank, computed in float32: mmseg's UperNet uses SyncBN, and its
    pyramid pooling normalises 1 x 1 features, whose per-rank statistics at the paper's 2 images per GPU are two
    values per channel (at 1 image, none: PyTorch refuses them). Every rank of a step runs the same dataset, so
    the statistics are taken over all ranks (two all-reduces: sum, then centred squares, both differentiable), and
    the running statistics are the same on every rank. Float32 whatever the input and weights, as mmcv's fp16
    training and apex keep BatchNorm: DeepSpeed's fp16 / bf16 engine casts the weights but keeps the running
    statistics in float32, a mix that not every kernel takes. In one process it is ``nn.BatchNorm2d`` in float32.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and distributed()):
            update = self.training and self.track_running_stats
            if update:
                self.num_batches_tracked.add_(1)
            stats = (None, None) if self.training and not self.track_running_stats else (self.running_mean,
                                                                                         self.running_var)
            out = F.batch_norm(x.float(), *stats, self.weight.float(), self.bias.float(),
                               self.training or not self.track_running_stats, self.momentum if update else 0.0,
                               self.eps)
            return out.to(x.dtype)
        x32 = x.float()
        count = x32.numel() // x32.shape[1] * world()[1]
        mean = sum_over_ranks(x32.sum(dim=(0, 2, 3))) / count
        centred = x32 - mean.view(1, -1, 1, 1)
        var = sum_over_ranks(centred.square().sum(dim=(0, 2, 3))) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                self.running_mean.lerp_(mean.detach(), self.momentum)
                self.running_var.lerp_(var.detach() * count / max(count - 1, 1), self.momentum)
        out = centred * torch.rsqrt(var + self.eps).view(1, -1, 1, 1)
        return (out * self.weight.float().view(1, -1, 1, 1) + self.bias.float().view(1, -1, 1, 1)).to(x.dtype)


def sync_batchnorm(module: nn.Module) -> nn.Module:
    """Turn every ``nn.BatchNorm2d`` of ``module`` (also those third-party decoders build) into
    :class:`SyncBatchNorm2d`, in place: same state."""
    for m in module.modules():
        if type(m) is nn.BatchNorm2d:
            m.__class__ = SyncBatchNorm2d
    return module

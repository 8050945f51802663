"""Task heads on the backbone's four stage features (strides 4, 8, 16, 32). Each head has
``forward(features)``, ``loss(output, batch, reduce_mean=None) -> (loss, {name: value})`` and
``predict(output, batch)``; ``reduce_mean`` averages a count over the data-parallel ranks (only the detection
loss's normaliser needs one).

Classification: a linear layer on pooled, normalised last-stage features. Detection: RetinaNet from
torchvision's parts (FPN P3-P7 on stages 2-4 plus two extra levels, ``RetinaNetHead``, anchors, focal +
L1 box losses, batched NMS) with mmdet's RetinaNet hyper-parameters. Segmentation: UperNet
(``segmentation_models_pytorch``'s ``UPerNetDecoder``) and an optional FCN auxiliary head on stage 3, as in
the mmseg recipe.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from segmentation_models_pytorch.decoders.upernet.decoder import UPerNetDecoder
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.retinanet import RetinaNet, RetinaNetHead
from torchvision.ops import box_iou, sigmoid_focal_loss
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelP6P7

from mthl_ds.data.pipelines import IGNORE_INDEX


class ClassificationHead(nn.Module):
    def __init__(self, stage_channels: Sequence[int], num_classes: int):
        super().__init__()
        self.norm = nn.LayerNorm(stage_channels[-1])
        self.fc = nn.Linear(stage_channels[-1], num_classes)

    def forward(self, features: list[Tensor]) -> Tensor:
        return self.fc(self.norm(features[-1].mean(dim=(2, 3))))

    def loss(self, logits: Tensor, batch: dict, reduce_mean=None) -> tuple[Tensor, dict]:
        loss = F.cross_entropy(logits.float(), batch["label"])
        return loss, {"ce": float(loss.detach())}

    def predict(self, logits: Tensor, batch: dict) -> Tensor:
        return logits.float()


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


class RetinaNetDetectionHead(nn.Module):
    """FPN P3-P7 + RetinaNet subnets. Anchors: 3 scales x 3 ratios per level, base size 4 x stride, placed at the
    fixed strides 8-128 as mmdet places them (torchvision's generator derives each stride as canvas size // level
    size, 61 and 114 px instead of 64 and 128 on an 800 x 1344 canvas), always in float32.

    ``predict`` calls torchvision's ``RetinaNet.postprocess_detections`` with this module in place of a
    ``RetinaNet`` (it reads only the coder and thresholds set here); ``loss`` is mmdet's (see there).
    """

    strides = (8, 16, 32, 64, 128)

    def __init__(self, stage_channels: Sequence[int], num_classes: int, fpn_channels: int = 256,
                 score_thresh: float = 0.05, nms_thresh: float = 0.5, detections_per_img: int = 100,
                 topk_candidates: int = 1000):
        super().__init__()
        self.fpn = FeaturePyramidNetwork(list(stage_channels[1:]), fpn_channels,
                                         extra_blocks=LastLevelP6P7(fpn_channels, fpn_channels))
        self.cell_anchors = [retina_cell_anchors(s) for s in self.strides]
        self.num_anchors = len(self.cell_anchors[0])
        self.head = RetinaNetHead(fpn_channels, self.num_anchors, num_classes)
        self.proposal_matcher = det_utils.Matcher(0.5, 0.4, allow_low_quality_matches=True)
        self.box_coder = det_utils.BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
        self.score_thresh, self.nms_thresh = score_thresh, nms_thresh
        self.detections_per_img, self.topk_candidates = detections_per_img, topk_candidates

    def forward(self, features: list[Tensor]) -> dict:
        pyramid = list(self.fpn({str(i): f for i, f in enumerate(features[1:])}).values())
        return {**self.head(pyramid), "pyramid": pyramid}

    def level_anchors(self, pyramid: list[Tensor]) -> list[Tensor]:
        return [level_anchors(cell, stride, *p.shape[-2:]).to(p.device)
                for cell, stride, p in zip(self.cell_anchors, self.strides, pyramid)]

    def anchors(self, images: Tensor, pyramid: list[Tensor]) -> list[Tensor]:
        """Every image's anchors (all levels concatenated); every image of a batch shares the canvas."""
        return [torch.cat(self.level_anchors(pyramid))] * images.shape[0]

    def loss(self, output: dict, batch: dict, reduce_mean: Optional[Callable[[Tensor], Tensor]] = None
             ) -> tuple[Tensor, dict]:
        """mmdet's RetinaNet loss: focal loss (alpha 0.25, gamma 2) over every anchor that is not ignored (IoU
        between 0.4 and 0.5) and L1 on the positives' box deltas, both summed over the batch and divided by one
        ``avg_factor``: the batch's positive anchors, each image counting at least one (mmdet's
        ``num_total_pos``), averaged over the data-parallel ranks when ``reduce_mean`` is given (as mmdet's
        FCOS / ATSS heads average theirs; its RetinaNet head keeps each GPU's own count), so the loss and its
        gradient do not depend on the number of ranks. torchvision's ``compute_loss`` instead divides each
        image's loss by that image's own positives."""
        anchors = torch.cat(self.level_anchors(output["pyramid"]))
        cls_logits, deltas = output["cls_logits"].float(), output["bbox_regression"].float()
        focal, l1, positives = cls_logits.new_zeros(()), cls_logits.new_zeros(()), 0
        for logits, regression, boxes, labels in zip(cls_logits, deltas, batch["boxes"], batch["labels"]):
            if len(boxes):
                matched = self.proposal_matcher(box_iou(boxes, anchors))
            else:  # every anchor is background
                matched = torch.full((len(anchors),), det_utils.Matcher.BELOW_LOW_THRESHOLD, device=anchors.device)
            foreground = matched >= 0
            target = torch.zeros_like(logits)
            target[foreground, labels[matched[foreground]]] = 1.0
            scored = matched != det_utils.Matcher.BETWEEN_THRESHOLDS
            focal = focal + sigmoid_focal_loss(logits[scored], target[scored], reduction="sum")
            targets = self.box_coder.encode_single(boxes[matched[foreground]], anchors[foreground])
            l1 = l1 + F.l1_loss(regression[foreground], targets, reduction="sum")
            positives += max(int(foreground.sum()), 1)
        count = torch.tensor(float(positives))
        avg_factor = (reduce_mean(count) if reduce_mean is not None else count).clamp(min=1.0).to(focal.device)
        focal, l1 = focal / avg_factor, l1 / avg_factor
        return focal + l1, {"focal": float(focal.detach()), "l1": float(l1.detach()), "positives": positives}

    @torch.no_grad()
    def predict(self, output: dict, batch: dict) -> list[dict]:
        """Detections per image in the *original* image's pixels (boxes xyxy, scores, contiguous labels)."""
        images, pyramid = batch["image"], output["pyramid"]
        per_level = [p.shape[-2] * p.shape[-1] * self.num_anchors for p in pyramid]
        split = {k: list(output[k].float().split(per_level, dim=1)) for k in ("cls_logits", "bbox_regression")}
        anchors = [self.level_anchors(pyramid)] * images.shape[0]
        shapes = [tuple(images.shape[-2:])] * images.shape[0]
        detections = RetinaNet.postprocess_detections(self, split, anchors, shapes)
        for det, scale, (height, width) in zip(detections, batch["scale"].tolist(), batch["orig_size"]):
            boxes = det["boxes"] / scale  # back to the original image, clipped to it (mmdet clips to the image)
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
            det["boxes"] = boxes
        return detections


class FCNAuxHead(nn.Module):
    """mmseg's auxiliary FCN head: one 3x3 conv-BN-ReLU and a 1x1 classifier on stage 3."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(in_channels, channels, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(channels), nn.ReLU(inplace=True))
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.conv(x))


class UperNetSegmentationHead(nn.Module):
    """UperNet decoder (PPM + FPN fusion at stride 4), a 1x1 classifier, optional FCN auxiliary head.

    Args:
        aux_weight: weight of the auxiliary head's loss (mmseg: 0.4); 0 builds no auxiliary head.
    """

    def __init__(self, stage_channels: Sequence[int], num_classes: int, channels: int = 512, aux_weight: float = 0.4):
        super().__init__()
        # UPerNetDecoder skips the stride-1 and stride-2 entries of its input list.
        self.decoder = UPerNetDecoder([3, 0, *stage_channels], encoder_depth=5, decoder_channels=channels)
        self.classifier = nn.Conv2d(channels, num_classes, kernel_size=1)
        self.aux_weight = aux_weight
        self.aux = FCNAuxHead(stage_channels[2], num_classes, channels // 2) if aux_weight > 0 else None

    def forward(self, features: list[Tensor]) -> dict:
        out = {"logits": self.classifier(self.decoder([torch.empty(0), torch.empty(0), *features]))}
        if self.aux is not None and self.training:
            out["aux"] = self.aux(features[2])
        return out

    def loss(self, output: dict, batch: dict, reduce_mean=None) -> tuple[Tensor, dict]:
        mask = batch["mask"]
        ce = lambda logits: F.cross_entropy(  # noqa: E731
            F.interpolate(logits.float(), size=mask.shape[-2:], mode="bilinear", align_corners=False), mask,
            ignore_index=IGNORE_INDEX)
        main = ce(output["logits"])
        logs = {"ce": float(main.detach())}
        if "aux" in output:
            aux = ce(output["aux"])
            logs["aux_ce"] = float(aux.detach())
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
            part = image_logits[:, :max(1, round(h * scale)), :max(1, round(w * scale))]
            masks.append(F.interpolate(part[None], size=(h, w), mode="bilinear", align_corners=False)[0].argmax(0))
        return masks


class SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) whose gradient is the all-reduced gradient: every rank's statistics feed every rank's loss."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        x = x.clone()
        torch.distributed.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.clone()
        torch.distributed.all_reduce(grad)
        return grad


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
        distributed = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
        if not (self.training and distributed):
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
        count = x32.numel() // x32.shape[1] * torch.distributed.get_world_size()
        mean = SumOverRanks.apply(x32.sum(dim=(0, 2, 3))) / count
        centred = x32 - mean.view(1, -1, 1, 1)
        var = SumOverRanks.apply(centred.square().sum(dim=(0, 2, 3))) / count
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


def build_head(task: str, stage_channels: Sequence[int], num_classes: int, aux_weight: float = 0.4,
               channels: int = 0) -> nn.Module:
    """A task's head; ``channels`` overrides the FPN (detection) or decoder (segmentation) width when > 0."""
    if task == "classification":
        return ClassificationHead(stage_channels, num_classes)
    if task == "detection":
        return RetinaNetDetectionHead(stage_channels, num_classes, fpn_channels=channels or 256)
    if task == "segmentation":
        return sync_batchnorm(UperNetSegmentationHead(stage_channels, num_classes, channels=channels or 512,
                                                         aux_weight=aux_weight))
    raise ValueError(f"unknown task {task!r}")

"""Task heads on the backbone's four stage features (strides 4, 8, 16, 32). Each head has
``forward(features)``, ``loss(output, batch) -> (loss, {name: value})`` and ``predict(output, batch)``.

Classification: a linear layer on pooled, normalised last-stage features. Detection: RetinaNet from
torchvision's parts (FPN P3-P7 on stages 2-4 plus two extra levels, ``RetinaNetHead``, anchors, focal +
L1 box losses, batched NMS) with mmdet's RetinaNet hyper-parameters. Segmentation: UperNet
(``segmentation_models_pytorch``'s ``UPerNetDecoder``) and an optional FCN auxiliary head on stage 3, as in
the mmseg recipe.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from segmentation_models_pytorch.decoders.upernet.decoder import UPerNetDecoder
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.retinanet import RetinaNet, RetinaNetHead
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelP6P7

from mthl_ds.data.pipelines import IGNORE_INDEX



class ClassificationHead(nn.Module):
    def __init__(self, stage_channels: Sequence[int], num_classes: int):
        super().__init__()
        self.norm = nn.LayerNorm(stage_channels[-1])
        self.fc = nn.Linear(stage_channels[-1], num_classes)

    def forward(self, features: list[Tensor]) -> Tensor:
        return self.fc(self.norm(features[-1].mean(dim=(2, 3))))

    def loss(self, logits: Tensor, batch: dict) -> tuple[Tensor, dict]:
        loss = F.cross_entropy(logits.float(), batch["label"])
        return loss, {"ce": float(loss.detach())}

    def predict(self, logits: Tensor, batch: dict) -> Tensor:
        return logits.float()


class RetinaNetDetectionHead(nn.Module):
    """FPN P3-P7 + RetinaNet subnets. Anchors: 3 scales x 3 ratios per level, base size 4 x stride (mmdet).

    ``loss`` and ``predict`` call torchvision's ``RetinaNet.compute_loss`` / ``postprocess_detections`` with
    this module in place of a ``RetinaNet`` (they read only the matcher, coder, head and thresholds set here).
    """

    strides = (8, 16, 32, 64, 128)

    def __init__(self, stage_channels: Sequence[int], num_classes: int, fpn_channels: int = 256,
                 score_thresh: float = 0.05, nms_thresh: float = 0.5, detections_per_img: int = 100,
                 topk_candidates: int = 1000):
        super().__init__()
        self.fpn = FeaturePyramidNetwork(list(stage_channels[1:]), fpn_channels,
                                         extra_blocks=LastLevelP6P7(fpn_channels, fpn_channels))
        sizes = tuple(tuple(4 * s * 2 ** (i / 3) for i in range(3)) for s in self.strides)
        self.anchor_generator = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
        self.head = RetinaNetHead(fpn_channels, self.anchor_generator.num_anchors_per_location()[0], num_classes)
        self.proposal_matcher = det_utils.Matcher(0.5, 0.4, allow_low_quality_matches=True)
        self.box_coder = det_utils.BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
        self.score_thresh, self.nms_thresh = score_thresh, nms_thresh
        self.detections_per_img, self.topk_candidates = detections_per_img, topk_candidates

    def forward(self, features: list[Tensor]) -> dict:
        pyramid = list(self.fpn({str(i): f for i, f in enumerate(features[1:])}).values())
        return {**self.head(pyramid), "pyramid": pyramid}

    def anchors(self, images: Tensor, pyramid: list[Tensor]) -> list[Tensor]:
        sizes = [tuple(images.shape[-2:])] * images.shape[0]
        return self.anchor_generator(ImageList(images, sizes), pyramid)

    def loss(self, output: dict, batch: dict) -> tuple[Tensor, dict]:
        anchors = self.anchors(batch["image"], output["pyramid"])
        targets = [{"boxes": b, "labels": l} for b, l in zip(batch["boxes"], batch["labels"])]
        head_out = {k: output[k].float() for k in ("cls_logits", "bbox_regression")}
        parts = RetinaNet.compute_loss(self, targets, head_out, anchors)
        return sum(parts.values()), {"focal": float(parts["classification"].detach()),
                                     "l1": float(parts["bbox_regression"].detach())}

    @torch.no_grad()
    def predict(self, output: dict, batch: dict) -> list[dict]:
        """Detections per image in the *original* image's pixels (boxes xyxy, scores, contiguous labels)."""
        images, pyramid = batch["image"], output["pyramid"]
        per_level = [p.shape[-2] * p.shape[-1] * self.anchor_generator.num_anchors_per_location()[0] for p in pyramid]
        split = {k: list(output[k].float().split(per_level, dim=1)) for k in ("cls_logits", "bbox_regression")}
        anchors = [list(a.split(per_level)) for a in self.anchors(images, pyramid)]
        shapes = [tuple(images.shape[-2:])] * images.shape[0]
        detections = RetinaNet.postprocess_detections(self, split, anchors, shapes)
        for det, scale in zip(detections, batch["scale"].tolist()):
            det["boxes"] = det["boxes"] / scale
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

    def loss(self, output: dict, batch: dict) -> tuple[Tensor, dict]:
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
    def predict(self, output: dict, batch: dict) -> Tensor:
        logits = F.interpolate(output["logits"].float(), size=batch["mask"].shape[-2:], mode="bilinear",
                               align_corners=False)
        return logits.argmax(1)


def build_head(task: str, stage_channels: Sequence[int], num_classes: int, aux_weight: float = 0.4,
               channels: int = 0) -> nn.Module:
    """A task's head; ``channels`` overrides the FPN (detection) or decoder (segmentation) width when > 0."""
    if task == "classification":
        return ClassificationHead(stage_channels, num_classes)
    if task == "detection":
        return RetinaNetDetectionHead(stage_channels, num_classes, fpn_channels=channels or 256)
    if task == "segmentation":
        return UperNetSegmentationHead(stage_channels, num_classes, channels=channels or 512, aux_weight=aux_weight)
    raise ValueError(f"unknown task {task!r}")

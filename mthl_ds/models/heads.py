"""Task heads on the backbone's four stage features (strides 4, 8, 16, 32).

Classification: a linear layer on pooled, normalised last-stage features. Detection: RetinaNet from
torchvision's parts (FPN P3-P7 on stages 2-4 plus two extra levels, ``RetinaNetHead``). Segmentation:
UperNet (``segmentation_models_pytorch``'s ``UPerNetDecoder``) and a 1x1 classifier at stride 4.
"""
from __future__ import annotations

from typing import Sequence

import torch
from segmentation_models_pytorch.decoders.upernet.decoder import UPerNetDecoder
from torch import Tensor, nn
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelP6P7


class ClassificationHead(nn.Module):
    def __init__(self, stage_channels: Sequence[int], num_classes: int):
        super().__init__()
        self.norm = nn.LayerNorm(stage_channels[-1])
        self.fc = nn.Linear(stage_channels[-1], num_classes)

    def forward(self, features: list[Tensor]) -> Tensor:
        pooled = features[-1].mean(dim=(2, 3))
        return self.fc(self.norm(pooled))


class RetinaNetDetectionHead(nn.Module):
    """FPN P3-P7 + RetinaNet classification/box subnets; returns the head outputs and the FPN maps."""

    def __init__(self, stage_channels: Sequence[int], num_classes: int, num_anchors: int = 9,
                 fpn_channels: int = 256):
        super().__init__()
        self.fpn = FeaturePyramidNetwork(list(stage_channels[1:]), fpn_channels,
                                         extra_blocks=LastLevelP6P7(fpn_channels, fpn_channels))
        self.head = RetinaNetHead(fpn_channels, num_anchors, num_classes)

    def forward(self, features: list[Tensor]) -> tuple[dict[str, Tensor], list[Tensor]]:
        pyramid = list(self.fpn({str(i): f for i, f in enumerate(features[1:])}).values())
        return self.head(pyramid), pyramid


class UperNetSegmentationHead(nn.Module):
    """UperNet decoder (PPM + FPN fusion at stride 4) and a 1x1 classifier; logits at stride 4."""

    def __init__(self, stage_channels: Sequence[int], num_classes: int, channels: int = 512):
        super().__init__()
        # UPerNetDecoder skips the stride-1 and stride-2 entries of its input list.
        self.decoder = UPerNetDecoder([3, 0, *stage_channels], encoder_depth=5, decoder_channels=channels)
        self.classifier = nn.Conv2d(channels, num_classes, kernel_size=1)

    def forward(self, features: list[Tensor]) -> Tensor:
        return self.classifier(self.decoder([torch.empty(0), torch.empty(0), *features]))


HEADS = {"classification": ClassificationHead, "detection": RetinaNetDetectionHead,
         "segmentation": UperNetSegmentationHead}


def build_head(task: str, stage_channels: Sequence[int], num_classes: int) -> nn.Module:
    if task not in HEADS:
        raise ValueError(f"unknown task {task!r}; choose from {sorted(HEADS)}")
    return HEADS[task](stage_channels, num_classes)

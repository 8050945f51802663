"""Input geometry and the constants every layer shares (ImageNet normalisation, the ignored mask value): the
sizes the backbones accept, checked when a recipe is loaded (no model is built, nothing heavy imported).

Every backbone here has a total stride of 32: Swin and DaViT a stride-4 stem and three 2x downsamplings, a ViT
its 16-pixel patches and the feature pyramid's 2x pool. A side that is a multiple of 32 gives stage features of
exactly H/4 .. H/32, which the heads assume (RetinaNet's anchors at strides 8-128, as mmdet places them; the
UperNet fusion); timm's Swin refuses any side that is not a multiple of its patch (4) and pads odd stages
before each patch merging, and DaViT and the ViT pad silently, so the features would drift off those strides.
Swin also pads every stage to its window (the window as built for ``model.img_size``): a stage smaller than
one window would be mostly padding, so sizes are at least 32 x that window.

The detection canvas is the recipe's size padded up to a multiple of 32, as mmdet's ``Pad(size_divisor=32)``
does (800 x 1333 -> 800 x 1344); classification and segmentation crops are taken as given and must fit.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

STRIDE = 32
MEAN = (0.485, 0.456, 0.406)  # ImageNet normalisation (timm's IMAGENET_DEFAULT_MEAN / _STD), RGB
STD = (0.229, 0.224, 0.225)
IGNORE_INDEX = 255  # segmentation pixels of no class: mmseg's ignore_index
SWIN_WINDOWS = {"swin_debug": 4}  # the paper's Swin backbones: 7 (the "window7" in their names)


def swin_window(backbone: str) -> Optional[int]:
    if not backbone.startswith("swin"):
        return None
    return SWIN_WINDOWS.get(backbone, 7)


def smallest_side(backbone: str, img_size: int) -> int:
    """The smallest side whose last stage still holds a whole window (``STRIDE`` for non-Swin backbones)."""
    window = swin_window(backbone)
    if window is None:
        return STRIDE
    return STRIDE * min(window, max(1, img_size // STRIDE))  # timm shrinks a window to a smaller stage at build


def padded(size: Sequence[int]) -> tuple[int, int]:
    """A detection canvas: each side padded up to a multiple of ``STRIDE`` (mmdet's size_divisor)."""
    return tuple(math.ceil(s / STRIDE) * STRIDE for s in size)


def resized_extent(height: int, width: int, scale: float) -> tuple[int, int]:
    """The (h, w) an image of (height, width) takes once resized by ``scale`` into its input: the part of the
    canvas or crop that holds the image, the rest being padding. Rounded half up, as mmcv's ``rescale_size``."""
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def rescale_factor(height: int, width: int, short: int, long: int) -> float:
    """The factor that fits an image's short side into ``short`` and its long side into ``long``, the larger
    of the two that does: mmcv's ``rescale_size`` (``Resize(keep_ratio=True)``)."""
    return min(long / max(height, width), short / min(height, width))


def axis_scales(height: int, width: int, scale: float) -> tuple[float, float]:
    """(x, y) factors from an image's pixels to its resized extent's: each side's whole-pixel size over its own,
    as mmdet's ``Resize(keep_ratio=True)`` scales boxes (``scale`` itself is neither, once the sides are rounded)."""
    new_h, new_w = resized_extent(height, width, scale)
    return new_w / width, new_h / height


CANVAS_TASKS = frozenset({"detection"})  # task kinds whose input is a padded canvas, not a crop


def input_shape(task: str, size: Sequence[int]) -> tuple[int, int]:
    """The model's input (h, w) for a dataset of ``task`` and recipe ``size``: the padded canvas for detection,
    the crop itself for the other kinds."""
    return padded(size) if task in CANVAS_TASKS else tuple(size)


def nearest_valid(size: Sequence[int], backbone: str, img_size: int) -> tuple[int, int]:
    low = smallest_side(backbone, img_size)
    return tuple(max(low, STRIDE * math.floor(s / STRIDE + 0.5)) for s in size)


def size_problem(backbone: str, img_size: int, task: str, size: Sequence[int]) -> Optional[str]:
    """Why ``backbone`` (built for ``img_size``) cannot take ``size`` (h, w) as ``task`` input; None if it can."""
    shape = input_shape(task, size)
    low = smallest_side(backbone, img_size)
    if all(s % STRIDE == 0 and s >= low for s in shape):
        return None
    what = f"its detection canvas {list(shape)} " if shape != tuple(size) else ""
    window = swin_window(backbone)
    need = f"sides that are multiples of {STRIDE} (the total stride)"
    if window is not None:
        need += f" and at least {low} (one {min(window, max(1, img_size // STRIDE))}-wide window in the last stage)"
    nearest = list(nearest_valid(size, backbone, img_size))
    return f"{what}does not fit {backbone}, which needs {need}; nearest valid: {nearest}"

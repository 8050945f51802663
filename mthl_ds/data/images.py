"""One image reader for the converters, the training pipelines and prediction: a file (or its bytes) becomes the
8-bit RGB image a viewer shows.

- EXIF orientation is applied, as OpenCV's ``imread``, mmcv's readers and detectron2's ``read_image`` apply it:
  a phone photo stored 400x600 with Orientation 6 is read upright at 600x400. Annotations of converted datasets
  are in the frame this reader produces (the upright one); results of prediction are too.
- Every pixel mode becomes 8-bit RGB by its meaning, not by clipping: 16-bit integers (``I;16*``, and ``I``
  holding 0-65535, as 16-bit PNGs and TIFFs open) are scaled by 255 / 65535; float images (``F``, float TIFFs)
  are taken as 0-1 and clipped there; grey, 1-bit, palette, CMYK and YCbCr are converted by PIL; an alpha
  channel (``LA``, ``RGBA``, ``PA``, palette transparency) is dropped, as ``imread`` drops it. Any other mode
  is refused, naming the file and the mode.

And OpenCV's parts of mmdet's and mmseg's pipelines (``data/pipelines.py``), without OpenCV: its resizes, as
mmcv's ``imresize`` calls them (bilinear for images, nearest for masks), and its 8-bit HSV, which mmseg's
photometric distortion works in.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Optional, Union

import numpy as np
from PIL import Image, ImageOps

from mthl_ds.errors import InputError

CONVERTED = {"RGB", "RGBA", "RGBX", "RGBa", "L", "LA", "La", "P", "PA", "1", "CMYK", "YCbCr"}
SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N"}
SUPPORTED = sorted(CONVERTED | SIXTEEN_BIT | {"I", "F"})


class ImageReadError(InputError):
    """A file that is not a usable image: not found, not readable, not decodable, or of an unsupported mode; the
    message names the file and which."""


def read_bytes(path: Union[str, Path]) -> bytes:
    """A file's bytes, with an error that says whether it is missing or unreadable."""
    path = Path(path)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ImageReadError(f"{path}: file not found") from None
    except PermissionError:
        raise ImageReadError(f"{path}: permission denied") from None
    except IsADirectoryError:
        raise ImageReadError(f"{path}: is a folder, not an image file") from None
    except OSError as e:
        raise ImageReadError(f"{path}: cannot be read ({e.strerror or e})") from None


def decode(data: bytes, name: Union[str, Path] = "image") -> Image.Image:
    """The image in ``data``, fully decoded (a truncated file fails here), in its stored mode and orientation."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL warns on odd EXIF; a file that decodes is used
            img = Image.open(io.BytesIO(data))
            img.load()
        return img
    except Exception as e:  # PIL raises several types for files that are not images
        reason = str(e) or type(e).__name__
        raise ImageReadError(f"{name}: does not decode as an image ({reason})") from None


def upright(img: Image.Image) -> Image.Image:
    """``img`` turned as its EXIF orientation says, with the orientation then removed from its EXIF (so that
    reading it again does not turn it twice); a broken EXIF block is no orientation."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # PIL raises several types for malformed EXIF
        return img


def to_rgb(img: Image.Image, name: Union[str, Path] = "image") -> Image.Image:
    """``img`` as 8-bit RGB in its displayed orientation (module docstring)."""
    img = upright(img)
    mode = img.mode
    if mode in CONVERTED:
        rgb = img.convert("RGB")
    elif mode in SIXTEEN_BIT or mode == "I":
        values = np.asarray(img).astype(np.int64)
        if mode == "I" and values.size and (values.min() < 0 or values.max() > 65535):
            raise ImageReadError(f"{name}: unsupported pixel mode 'I' with values {values.min()}..{values.max()} "
                                 "(32-bit integers; 16-bit 0-65535 is read)")
        rgb = Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8)).convert("RGB")
    elif mode == "F":
        values = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0)
        rgb = Image.fromarray(np.rint(np.clip(values, 0, 1) * 255).astype(np.uint8)).convert("RGB")
    else:
        raise ImageReadError(f"{name}: unsupported pixel mode {mode!r} (supported: {', '.join(SUPPORTED)})")
    return rgb


def read_rgb(path: Union[str, Path]) -> Image.Image:
    """The 8-bit RGB, upright image in the file at ``path``; errors name the file and what is wrong."""
    return to_rgb(decode(read_bytes(path), path), path)


def rgb_from_bytes(data: bytes, name: Union[str, Path] = "image") -> Image.Image:
    """The 8-bit RGB, upright image in ``data`` (a shard member); errors name ``name``."""
    return to_rgb(decode(data, name), name)


def displayed_size(data: bytes, name: Union[str, Path] = "image") -> tuple[int, int]:
    """(width, height) of the image in ``data`` as this reader produces it, after checking that it decodes fully
    and that its mode is supported."""
    return rgb_from_bytes(data, name).size


def rgb_to_hsv(img: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> HSV as OpenCV's 8-bit conversion lays it out (H in [0, 180), S and V in [0, 255]),
    computed in float32 and rounded (OpenCV computes in fixed point: a level apart at most)."""
    rgb = img.astype(np.float32)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v, low = rgb.max(-1), rgb.min(-1)
    diff = v - low
    s = np.where(v > 0, diff * 255 / np.maximum(v, 1), 0)
    safe = np.maximum(diff, 1e-6)
    h = np.where(v == r, (g - b) * 60 / safe, np.where(v == g, 120 + (b - r) * 60 / safe, 240 + (r - g) * 60 / safe))
    h = np.where(diff == 0, 0, np.where(h < 0, h + 360, h))
    return np.stack([np.round(h / 2) % 180, np.round(s), v], axis=-1).astype(np.uint8)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """The inverse of :func:`rgb_to_hsv`: OpenCV's 8-bit HSV -> RGB (its float formula, rounded: within a level of
    OpenCV's)."""
    h = hsv[..., 0].astype(np.float32) * (6 / 180)
    s, v = hsv[..., 1].astype(np.float32) / 255, hsv[..., 2].astype(np.float32) / 255
    sector = np.floor(h)
    f = h - sector
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    sector = sector.astype(np.int64) % 6
    r = np.choose(sector, [v, q, p, p, t, v])
    g = np.choose(sector, [t, v, v, q, p, p])
    b = np.choose(sector, [p, p, t, v, v, q])
    return np.clip(np.round(np.stack([r, g, b], axis=-1) * 255), 0, 255).astype(np.uint8)


def linear_taps(src: int, dst: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Along one axis of OpenCV's ``INTER_LINEAR`` resize from ``src`` to ``dst`` pixels: each output pixel's two
    source pixels and the second one's weight. Half-pixel centres; at the borders the edge pixel alone."""
    x = (np.arange(dst) + 0.5) * (1.0 / (dst / src)) - 0.5
    first = np.floor(x).astype(np.int64)
    weight = x - first
    outside = (first < 0) | (first >= src - 1)
    weight[outside] = 0.0
    first = np.clip(first, 0, src - 1)
    return first, np.minimum(first + 1, src - 1), weight


def resize_bilinear(img: np.ndarray, height: int, width: int,
                    window: Optional[tuple[int, int, int, int]] = None) -> np.ndarray:
    """An 8-bit (H, W, C) image resized to (height, width) as ``cv2.resize(INTER_LINEAR)``, which mmdet's and
    mmseg's ``Resize`` use: no antialiasing when it shrinks (PIL's bilinear filter widens to the scale). Computed
    in float and rounded, where OpenCV uses fixed point: within one level of it. ``window`` (top, left, h, w):
    only that part of the resized image, the same values computed alone (a training crop costs its own size)."""
    top, bottom, wy = linear_taps(img.shape[0], height)
    left, right, wx = linear_taps(img.shape[1], width)
    if window is not None:
        ys, xs = slice(window[0], window[0] + window[2]), slice(window[1], window[1] + window[3])
        top, bottom, wy, left, right, wx = top[ys], bottom[ys], wy[ys], left[xs], right[xs], wx[xs]
    rows = img[top].astype(np.float32) * (1 - wy[:, None, None]) + img[bottom] * wy[:, None, None]
    out = rows[:, left] * (1 - wx[None, :, None]) + rows[:, right] * wx[None, :, None]
    return np.floor(out + 0.5).clip(0, 255).astype(np.uint8)


def resize_nearest(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """A label map resized to (height, width) as ``cv2.resize(INTER_NEAREST)``, which mmseg's ``Resize`` uses
    for the segmentation map: output pixel x reads source pixel floor(x * src / dst), with no half-pixel shift
    (PIL's nearest reads floor((x + 0.5) * src / dst))."""
    def taps(src: int, dst: int) -> np.ndarray:
        return np.minimum(np.floor(np.arange(dst) * (1.0 / (dst / src))).astype(np.int64), src - 1)
    return mask[taps(mask.shape[0], height)][:, taps(mask.shape[1], width)]

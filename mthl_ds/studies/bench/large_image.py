"""What predicting one large photo costs in memory: the peak RSS of ``mthl-ds predict``'s work (read the photo,
predict, write its mask and overlay) on a 6000x4000 JPEG through the demo model with a segmentation head of C
classes, each candidate in a fresh process.

- ``banded``: the logits resized to the photo in bands of rows, then arg-maxed (:func:`heads.resized_argmax`).
- ``whole image``: the logits resized to the whole photo at once, then arg-maxed (mmseg's way; predict's before):
  C x 24 M float32 values. Run only where that fits in half of this machine's memory; otherwise the row says so.
- ``floor``: the same process after loading the model and reading the photo, without predicting.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np


def child(mode: str, model_path: str, photo: str, out: str) -> None:
    """One candidate, in this process; prints {"peak_rss_gb", "seconds"}."""
    import torch.nn.functional as F

    from mthl_ds.data.images import read_rgb
    from mthl_ds.models import heads
    from mthl_ds.predict import Predictor, run_predict
    if mode == "whole image":
        heads.resized_argmax = lambda logits, size: F.interpolate(  # noqa: E731
            logits[None].float(), size=size, mode="bilinear", align_corners=False)[0].argmax(0)
    start = time.perf_counter()
    if mode == "floor":
        Predictor.load(Path(model_path), "cpu")
        read_rgb(photo)
    else:
        run_predict(Path(model_path), "ade20k", [Path(photo)], Path(out), device="cpu")
    seconds = time.perf_counter() - start
    print(json.dumps({"peak_rss_gb": round(peak_rss() / 2**30, 3), "seconds": round(seconds, 2)}))


def peak_rss() -> int:
    """This process's peak resident memory in bytes (VmHWM: unlike ``ru_maxrss``, not inherited from the parent
    that started it)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmHWM line (Linux only)")


def machine_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def too_large(classes: int, size: tuple[int, int]) -> Optional[str]:
    """Why the whole-image resize is not run for this photo (None: it is): its resized logits would take over
    half this machine's memory."""
    gb = classes * size[0] * size[1] * 4 / 2**30
    if gb <= machine_memory() / 2**30 / 2:
        return None
    return f"not run: its resized logits alone take {gb:.1f} GB (arithmetic), over half this machine's memory"


def run(classes: tuple[int, ...] = (4, 150), size: tuple[int, int] = (6000, 4000)) -> list[dict]:
    from PIL import Image

    from mthl_ds.artifacts.export import save_export
    from mthl_ds.build import build_model
    from mthl_ds.config import load_recipe
    width, height = size
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        photo = Path(tmp) / "photo.jpg"
        yy, xx = np.mgrid[0:height, 0:width]
        Image.fromarray(np.stack([xx % 251, yy % 241, (xx + yy) % 239], -1).astype(np.uint8)).save(photo, quality=90)
        for count in classes:
            model_path = Path(tmp) / f"model{count}.safetensors"
            model = build_model(load_recipe("demo", [f"datasets.ade20k.num_classes={count}"]))
            save_export(model_path, model, {"tag": "bench"}, None)
            for mode in ("floor", "banded", "whole image"):
                row = {"benchmark": f"predict one {width}x{height} photo, {count}-class head", "candidate": mode}
                if mode == "whole image" and too_large(count, size):
                    rows.append({**row, "peak_rss_gb": too_large(count, size), "seconds": ""})
                    continue
                proc = subprocess.run([sys.executable, "-c", "import sys; from mthl_ds.studies.bench.large_image "
                                       "import child; child(*sys.argv[1:])", mode, str(model_path), str(photo),
                                       str(Path(tmp) / "out")], capture_output=True, text=True, check=False)
                if proc.returncode != 0:
                    raise RuntimeError(f"large-image benchmark, {mode} with {count} classes: {proc.stderr[-2000:]}")
                rows.append({**row, **json.loads(proc.stdout.strip().splitlines()[-1])})
    return rows

"""What integrity costs: checksum throughput (xxh3-64, the one chosen, against zlib's CRC32 and BLAKE2b), the time a
checkpoint's manifest adds to its save, and the time an export's checksum adds to its load.

The checkpoint is a recipe's model as a ZeRO checkpoint holds it: its weights in fp32 and fp16 and LAMB's two fp32
moments, written with ``torch.save`` into one folder (one file per kind), then checksummed as the trainer does
(:func:`mthl_ds.artifacts.manifest.describe`). The export is :func:`mthl_ds.artifacts.export.save_export` of the
recipe's model, loaded with :func:`~mthl_ds.artifacts.export.load_export`; the checksum's share is its own time
over the whole load. Each figure is the median of ``repeats``.
"""
from __future__ import annotations

import hashlib
import os
import statistics
import tempfile
import time
import zlib
from pathlib import Path

import torch
import xxhash

from mthl_ds.artifacts import manifest
from mthl_ds.artifacts.export import load_export, save_export, tensors_checksum
from mthl_ds.build import build_model
from mthl_ds.config import load_recipe

CHECKSUMS = {"xxh3_64": lambda b: xxhash.xxh3_64_hexdigest(b), "crc32 (zlib)": zlib.crc32,
             "blake2b": lambda b: hashlib.blake2b(b).hexdigest()}


def median_s(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def checkpoint_row(recipe: str, folder: Path, repeats: int) -> dict:
    """A folder of ``recipe``'s checkpoint size written with ``torch.save``, then checksummed as the trainer does."""
    folder.mkdir()
    weights = {k: v.float() for k, v in build_model(load_recipe(recipe)).state_dict().items()}
    parts = {"weights_fp32.pt": weights, "weights_fp16.pt": {k: v.half() for k, v in weights.items()},
             "moment_1.pt": weights, "moment_2.pt": weights}
    save = median_s(lambda: [torch.save(v, folder / k) for k, v in parts.items()], repeats)
    files = manifest.step_files(folder)
    size = sum((folder / f).stat().st_size for f in files)
    hashed = median_s(lambda: manifest.describe(folder, files), repeats)
    return {"benchmark": f"{recipe} checkpoint ({size / 1e9:.2f} GB: weights fp32 + fp16, two moments)",
            "candidate": "manifest (xxh3_64 of every file, just written)",
            "figure": f"save {save:.2f} s, manifest {hashed:.3f} s: +{100 * hashed / save:.0f}% "
                      f"({size / hashed / 1e9:.2f} GB/s)"}


def run(checkpoint_recipes: tuple[str, ...] = ("demo", "mthl_swin_t"), export_recipe: str = "mthl_swin_b",
        repeats: int = 3, buffer_mib: int = 256) -> list[dict]:
    buffer = os.urandom(buffer_mib << 20)
    rows = [{"benchmark": f"checksum of {buffer_mib} MiB in memory", "candidate": name,
             "figure": f"{len(buffer) / median_s(lambda: fn(buffer), repeats) / 1e9:.2f} GB/s"}
            for name, fn in CHECKSUMS.items()]
    with tempfile.TemporaryDirectory() as tmp:
        rows += [checkpoint_row(recipe, Path(tmp) / recipe, repeats) for recipe in checkpoint_recipes]
        model = build_model(load_recipe(export_recipe))
        path = save_export(Path(tmp) / "model.safetensors", model, {"kind": "benchmark"})
        del model
        load = median_s(lambda: load_export(path), repeats)
        state = load_export(path)[0].state_dict()
        check = median_s(lambda: tensors_checksum(state), repeats)
        rows.append({"benchmark": f"{export_recipe} export ({path.stat().st_size / 1e9:.2f} GB)",
                     "candidate": "checksum on load (xxh3_64 of the tensors)",
                     "figure": f"load {load:.2f} s, of which the checksum {check:.3f} s: {100 * check / load:.1f}%"})
    return rows

"""Data-pipeline benchmark: the classification pipeline against a bare decode-and-crop loop over the same
JPEGs (images/s per worker, one process), and detection / segmentation samples/s."""
from __future__ import annotations

import io
import math
import tempfile
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms import functional as TF

from mthl_ds.data.convert import convert_world
from mthl_ds.data.pipelines import PipelineConfig, make_decoder
from mthl_ds.data.reader import ShardSet, TrainStream, read_shard
from mthl_ds.studies.bench.common import side_by_side, timed
from mthl_ds.studies.synth import write_real_size_shards, write_world


def synthetic_shards(workdir: Path) -> dict[str, Path]:
    roots = write_world(workdir / "raw", seed=0)
    return convert_world(roots, workdir / "shards", shard_size=64, progress=lambda _: None)


def pipeline_loop(shard_set: ShardSet, cfg: PipelineConfig, count: int) -> None:
    stream = TrainStream(shard_set, make_decoder(cfg, train=True), seed=0)
    for _ in islice(iter(stream), count):
        pass


def bare_loop(jpegs: list[bytes], size: int) -> None:
    """Decode and random-resized-crop only: the floor any classification pipeline sits on."""
    crop = RandomResizedCrop(size, scale=(0.08, 1.0), antialias=True)
    for data in jpegs:
        img = Image.open(io.BytesIO(data)).convert("RGB")
        TF.to_tensor(crop(img))


def run(shards: dict[str, Path] | None = None, count: int = 400, repeats: int = 5, size: int = 64) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        shards = shards or synthetic_shards(Path(tmp))
        cls = ShardSet.open(shards["imagenet"] / "train")
        jpegs = [m["jpg"] for shard in cls.shards for _, m in read_shard(cls.root / shard["name"])[0]]
        jpegs = (jpegs * (count // len(jpegs) + 1))[:count]
        torch.set_num_threads(1)
        cls_cfg = PipelineConfig("classification", (size, size))
        result = side_by_side(lambda: pipeline_loop(cls, cls_cfg, count), lambda: bare_loop(jpegs, size), repeats)
        rows = [{"benchmark": "B5 classification pipeline vs bare decode+crop (1 worker)",
                 "candidate": f"{count / result['candidate_s']:.0f} img/s",
                 "baseline": f"{count / result['baseline_s']:.0f} img/s",
                 "ratio (throughput)": f"{1 / result['ratio_median']:.2f} "
                                       f"[{1 / result['ratio_max']:.2f}, {1 / result['ratio_min']:.2f}]",
                 "target": ">= 0.9", "images_per_s": count / result["candidate_s"],
                 "throughput_ratio": 1 / result["ratio_median"]}]
        for task, name, cfg in (("detection", "coco", PipelineConfig("detection", (128, 128))),
                                ("segmentation", "ade20k", PipelineConfig("segmentation", (64, 64)))):
            shard_set = ShardSet.open(shards[name] / "train")
            seconds = sorted(timed(lambda: pipeline_loop(shard_set, cfg, count // 2)) for _ in range(repeats))
            rate = (count // 2) / float(np.median(seconds))
            rows.append({"benchmark": f"{task} pipeline (1 worker)", "candidate": f"{rate:.0f} samples/s",
                         "baseline": "", "ratio (throughput)": "", "target": "", "images_per_s": rate})
    return rows


# V100 step times at the paper's per-GPU batches, from published runs (none measured here):
V100_STEP_S = {
    "classification": (64 / 380, "Swin-B on ImageNet-1K: 12 min per epoch on 16 V100 (microsoft/Swin-Transformer#68), "
                                 "111 img/s per GPU, scaled by FLOPs to Swin-T (15.4 / 4.5 GFLOPs): 380 img/s"),
    "detection": (0.335, "RetinaNet R-50-FPN, 2 images per V100: 0.335 s/iter (facebookresearch/detectron2#195); "
                         "Swin-T's backbone FLOPs are about R-50's"),
    "segmentation": (16 * 3600 / 160_000, "Swin-T on ADE20K 512 x 512, 2 images per V100, 160k iterations in ~16 h on "
                                          "8 V100 (facebookresearch/Mask2Former#81): 0.36 s/iter"),
}


def run_real_size(recipe_name: str = "mthl_swin_t", count: int = 48, repeats: int = 3) -> list[dict]:
    """Each dataset's training pipeline at the recipe's real sizes and augmentations, one worker (one process,
    one thread) on real-size synthetic images, and the workers per GPU that feed the recipe's batch at a V100
    step time."""
    from mthl_ds.config import load_recipe
    from mthl_ds.evaluate import pipeline_config
    recipe = load_recipe(recipe_name)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        shards = write_real_size_shards(Path(tmp), ranks=count // 2)
        torch.set_num_threads(1)
        for name, d in recipe.datasets.items():
            shard_set = ShardSet.open(shards / name / "train")
            cfg = pipeline_config(recipe, name)
            pipeline_loop(shard_set, cfg, 4)  # warm-up
            seconds = float(np.median([timed(lambda: pipeline_loop(shard_set, cfg, count)) for _ in range(repeats)]))
            rate = count / seconds
            step_s, source = V100_STEP_S[d.task]
            needed = d.batch_size / step_s
            rows.append({"benchmark": f"{name} pipeline at {list(d.size)}", "task": d.task,
                         "images_per_s_per_worker": round(rate, 1), "batch": d.batch_size,
                         "v100_step_s": round(step_s, 3), "images_per_s_needed": round(needed, 1),
                         "workers_per_gpu": math.ceil(needed / rate), "source": source})
    return rows

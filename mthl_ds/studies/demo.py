"""The embedded demo: synthetic world -> shards -> 2-rank DeepSpeed training (ZeRO 2, LAMB, expert
parallelism 2, all three tasks) -> evaluation -> report. Everything lands in one folder:

    DIR/world/     the synthetic datasets in their real layouts (ImageNet, COCO, ADE20K; Pets, Cityscapes, VOC)
    DIR/shards/    their WebDataset shards, made by the same converters as real data
    DIR/run/       the training run: config, metrics, TensorBoard, checkpoints, report.md
    DIR/final_metrics.json
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

from mthl_ds.config import load_recipe
from mthl_ds.studies.launch import train_command


def prepare_data(out: Path, seed: int = 0) -> Path:
    """Write the world and its shards once; a later demo in the same folder reuses them."""
    from mthl_ds.data.convert import convert_world
    from mthl_ds.studies.synth import write_world
    shards = out / "shards"
    if (shards / ".complete").is_file():
        return shards
    shutil.rmtree(out / "world", ignore_errors=True)
    roots = write_world(out / "world", seed=seed)
    convert_world(roots, shards, shard_size=32, workers=2, force=True)
    (shards / ".complete").write_text("ok\n")
    return shards


def run_demo(out: Path, overrides: tuple[str, ...] = (), ranks: int = 2, recipe: str = "demo") -> int:
    """``recipe``: the demo (MTHL) or a recipe built on it, e.g. demo_adamv (AdaMV-MoE), demo_modsquad (Mod-Squad)."""
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    load_recipe(recipe, overrides)  # refuse a bad recipe or override before any work
    start = time.time()
    shards = prepare_data(out)
    print(f"demo: data ready in {time.time() - start:.0f} s ({shards})", flush=True)
    shutil.rmtree(out / "run", ignore_errors=True)  # each demo trains from scratch; the data is reused
    cmd = train_command(ranks, recipe, out / "run", [f"train.data_root={shards}", *overrides])
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    rc = subprocess.call(cmd, env=env)
    if rc != 0:
        return rc
    final = out / "run" / "final_metrics.json"
    shutil.copy(final, out / "final_metrics.json")
    metrics = json.loads(final.read_text())
    print(f"\ndemo finished in {time.time() - start:.0f} s; report: {out / 'run' / 'report.md'}")
    for name, m in metrics.items():
        print(f"  {name:<10} {m['task']:<15} {m['metric']:<5} {m['value']:6.2f}  (chance {m['chance']:.2f})")
    return 0

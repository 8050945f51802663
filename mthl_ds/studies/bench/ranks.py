"""The 2-rank part of ``mthl-ds bench`` (run under torchrun by ``suite.rank_results``): B7 peak memory of
the demo engine, B4 ep_size 2 vs 1, B6 optimizer + gradient bytes of ZeRO 2 vs stage 0. Rank 0 writes JSON.

    python -m torch.distributed.run --nproc_per_node=2 -m mthl_ds.studies.bench.ranks OUT.json STEPS REPEATS
"""
from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import torch

from mthl_ds.build import build_model, training_loss
from mthl_ds.config import load_recipe
from mthl_ds.runtime.collectives import all_gather, all_reduce_mean, world
from mthl_ds.runtime.engine import build_engine, ep_rank, init_distributed, tensor_bytes
from mthl_ds.studies.bench.common import side_by_side
from mthl_ds.tasks import fake_batch


def demo_engine(*overrides: str):
    recipe = load_recipe("demo", list(overrides))
    ep = recipe.train.ep_size
    engine, _, _ = build_engine(build_model(recipe, ep_size=ep, ep_rank=ep_rank(ep)), recipe)
    return recipe, engine


def backward(engine, recipe, name: str, batch: dict) -> None:
    model = engine.module
    model.set_dataset(name)
    loss = training_loss(model, recipe, name, batch, output=engine(batch["image"])).loss
    model.backbone.update_routing_buffers(all_reduce_mean)
    engine.backward(loss)


def train_steps(engine, recipe, batches: dict, steps: int):
    def run():
        for _ in range(steps):
            for name, batch in batches.items():
                backward(engine, recipe, name, batch)
                engine.step()
    return run


def state_bytes(engine, recipe, name: str, batch: dict) -> dict[str, int]:
    """Optimizer and gradient bytes held once a step's backward is done (states exist after the first step)."""
    backward(engine, recipe, name, batch)
    params = list(engine.module.parameters())
    skip = {p.untyped_storage().data_ptr() for p in params}
    seen: set = set()
    parts = {"param.grad": sum(tensor_bytes(p.grad, seen, skip) for p in params)}
    holders = [engine.optimizer] + ([engine.optimizer.optimizer] if hasattr(engine.optimizer, "optimizer") else [])
    for holder in holders:  # DeepSpeed's ZeRO optimizer and the LAMB inside it, or our LAMB alone at stage 0
        for attr, value in vars(holder).items():
            if attr != "param_groups":
                parts[f"{type(holder).__name__}.{attr}"] = tensor_bytes(value, seen, skip)
    engine.step()
    return {k: v for k, v in parts.items() if v}


def main(out: Path, steps: int, repeats: int) -> None:
    init_distributed()
    rank, _ = world()
    torch.set_num_threads(1)
    recipe, ep2 = demo_engine()
    batches = {name: fake_batch(recipe, name, seed=rank) for name in recipe.datasets}
    train_steps(ep2, recipe, batches, steps)()
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # before any other engine exists
    recipe1, ep1 = demo_engine("train.ep_size=1")
    b4 = side_by_side(train_steps(ep2, recipe, batches, steps), train_steps(ep1, recipe1, batches, steps), repeats)
    recipe0, stage0 = demo_engine("train.ds_config=stage0_fp32.json")
    train_steps(stage0, recipe0, batches, 1)()
    name = next(iter(batches))
    zero2_parts = state_bytes(ep2, recipe, name, batches[name])
    stage0_parts = state_bytes(stage0, recipe0, name, batches[name])
    rss = all_gather(torch.tensor([float(max_rss)], dtype=torch.float64))
    if rank == 0:
        out.write_text(json.dumps({
            "b4": b4, "b7_max_rss": [int(r.item()) for r in rss],
            "b6": {"zero2": sum(zero2_parts.values()), "stage0": sum(stage0_parts.values()),
                   "zero2_parts": zero2_parts, "stage0_parts": stage0_parts}}, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))

"""2-rank worker: 5 LAMB steps of the demo model (MoE, ep_size 2) under ZeRO 0, 1 and 2 with our LAMB, and
under ZeRO 0 and 2 with timm's LAMB (DeepSpeed's per-partition behaviour). Each rank saves its weights, and
ZeRO 1/2's global gradient norm and overflow check as the engine computes them against DeepSpeed's own code on the
same gradients (``norms``)."""
import sys
from pathlib import Path

import deepspeed
import torch
import torch.nn.functional as F
from timm.optim import Lamb as TimmLamb

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moe_ranks import global_batch, per_expert  # noqa: E402

from mthl_ds.build import build_model  # noqa: E402
from mthl_ds.config import load_recipe  # noqa: E402
from mthl_ds.runtime.collectives import world  # noqa: E402
from mthl_ds.runtime.engine import (build_engine, ds_config, ep_rank, init_distributed, optimizer_groups,  # noqa: E402
                                    triangular_schedule)
from mthl_ds.studies.bench.launches import LaunchCount  # noqa: E402

STEPS = 5
RUNS = {"stage0": ("stage0_fp32.json", "ours"), "zero1": ("zero1_fp32.json", "ours"),
        "zero2": ("zero2_fp32.json", "ours"), "stage0_timm": ("stage0_fp32.json", "timm"),
        "zero2_timm": ("zero2_fp32.json", "timm")}


def overrides(ds_config_name: str, ep_size: int) -> list[str]:
    return ["model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.drop_tokens=false", "model.moe.losses={}",
            f"train.ds_config={ds_config_name}", f"train.ep_size={ep_size}", "train.seed=7", "train.lr=0.004",
            "train.weight_decay=0.05", "train.grad_clip=0.1", "train.warmup_steps=1", "train.steps=100"]


def train(engine, rank: int, world_size: int) -> None:
    per_rank = 8 // world_size
    for step in range(STEPS):
        images, labels = global_batch(8, seed=step)
        part = slice(rank * per_rank, (rank + 1) * per_rank)
        engine.module.set_dataset("imagenet")
        loss = F.cross_entropy(engine(images[part]), labels[part])
        engine.backward(loss)
        engine.step()


def weights(engine, ep_size: int) -> dict:
    return per_expert(((n, p.detach()) for n, p in engine.module.named_parameters()),
                      ep_rank(ep_size) * (4 // ep_size))


def run(name: str) -> dict:
    cfg, which = RUNS[name]
    recipe = load_recipe("demo", overrides(cfg, 2))
    model = build_model(recipe, ep_size=2, ep_rank=ep_rank(2))
    if which == "ours":
        engine, _, _ = build_engine(model, recipe)
    else:
        optimizer = TimmLamb(optimizer_groups(model, recipe.train.weight_decay), lr=recipe.train.lr, max_grad_norm=None)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config(recipe, 2),
                                          lr_scheduler=triangular_schedule(optimizer, 1, 100))
    rank, size = world()
    train(engine, rank, size)
    return weights(engine, 2)


def norms_against_deepspeed(cfg: str) -> dict:
    """After each backward, the ZeRO optimizer's global norm and local overflow flag (ours, installed by
    build_engine) next to DeepSpeed's own methods on the same gradients; the last step with a NaN planted in one
    expert gradient fragment on rank 1."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer as Zero
    recipe = load_recipe("demo", overrides(cfg, 2))
    engine, _, _ = build_engine(build_model(recipe, ep_size=2, ep_rank=ep_rank(2)), recipe)
    zero = engine.optimizer
    rank, size = world()
    out = {"ours": [], "deepspeed": [], "overflow_ours": [], "overflow_deepspeed": [], "groups": len(zero.bit16_groups)}
    for step in range(3):
        images, labels = global_batch(8, seed=step)
        engine.module.set_dataset("imagenet")
        engine.backward(F.cross_entropy(engine(images[rank * 4:(rank + 1) * 4]), labels[rank * 4:(rank + 1) * 4]))
        if step == 2 and rank == 1:
            expert_group = next(i for i, moe in enumerate(zero.is_moe_param_group) if moe)
            zero.averaged_gradients[expert_group][0].view(-1)[0] = float("nan")
        out["ours"].append(zero.scaled_global_norm())
        out["deepspeed"].append(Zero.scaled_global_norm(zero))
        out["overflow_ours"].append(zero.has_overflow_partitioned_grads_serial())
        out["overflow_deepspeed"].append(Zero.has_overflow_partitioned_grads_serial(zero))
        if step == 0:
            out["tensors"] = sum(len(zero.averaged_gradients[i]) for i in range(out["groups"]))
            for name, norm in (("ops_ours", lambda: zero.scaled_global_norm()),
                               ("ops_deepspeed", lambda: Zero.scaled_global_norm(zero))):
                with LaunchCount() as count:
                    norm()
                out[name] = sum(count.counts.values())
        if step < 2:
            engine.step()
    return out


if __name__ == "__main__":
    out = Path(sys.argv[1])
    init_distributed()
    results = {name: run(name) for name in RUNS}
    results["norms"] = {cfg: norms_against_deepspeed(cfg) for cfg in ("zero1_fp32.json", "zero2_fp32.json")}
    torch.save(results, out / f"rank{world()[0]}.pt")

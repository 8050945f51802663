"""2-rank worker for fp16 / bf16 training with DeepSpeed's real mixed-precision ZeRO 2 engine and LAMB (ep_size 2),
fp16 on the CPU through mthl_ds.runtime.cpu_half. Modes:

``overflow``: an inf injected into rank 1's gradient at steps 3 and 4; states captured before every step; then the
same run resumed from its step-2 checkpoint. ``track``: 5 steps of fp16 and bf16 ZeRO 2 against fp32 stage 0.
``precision``: dtypes inside an fp16 forward, and tied routes on both ranks. Rank 0 writes summary.json.
"""
import json
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from conftest import demo_overrides  # noqa: E402

from mthl_ds.config import load_recipe  # noqa: E402
from mthl_ds.runtime import cpu_half  # noqa: E402
from mthl_ds.runtime.collectives import all_gather_objects, barrier, world  # noqa: E402
from mthl_ds.train import Trainer  # noqa: E402

BROKEN = (3, 4)


def states(trainer: Trainer) -> dict:
    """What a skipped step must leave alone, on this rank."""
    engine = trainer.engine
    zero = engine.optimizer
    return {"params": {n: p.detach().clone() for n, p in engine.module.named_parameters()},
            "master": [t.detach().clone() for t in zero.single_partition_of_fp32_groups],
            "moments": [v.clone() for s in zero.optimizer.state.values() for v in s.values()
                        if isinstance(v, torch.Tensor)],
            "joint": {n: b.clone() for n, b in engine.module.named_buffers() if n.endswith("routing_joint")},
            "usage": {n: u.clone() for n, u in trainer.usage.items()},
            "scale": float(zero.loss_scale), "lr": trainer.scheduler.get_last_lr()[0]}


class OverflowOnRank1(Trainer):
    """Rank 1's backbone gradient becomes inf at the BROKEN steps; states are kept before every step."""

    def setup(self):
        super().setup()
        self.before = {}
        self.model.backbone.register_forward_hook(self.poison)

    def poison(self, module, args, features):
        if self.step in BROKEN and self.rank == 1 and torch.is_grad_enabled():
            features[-1].register_hook(lambda g: g * float("inf"))

    def train_step(self, step):
        self.before[step] = states(self)
        return super().train_step(step)


def same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def overflow(shards: Path, out: Path) -> dict:
    cpu_half.enable()
    # the repo's fp16 config starting at 2^10 (written by the test), so no demo step overflows by itself
    trainer_args = dict(steps=7, ckpt_every=2, keep_checkpoints=4, ds_config=str(out / "fp16_2p10.json"))
    straight = OverflowOnRank1(load_recipe("demo", demo_overrides(shards, **trainer_args)), out / "straight")
    straight.run()
    history = straight.history if straight.rank == 0 else []
    before, after_run = straight.before, states(straight)
    summary = {
        "skipped": all_gather_objects([h["step"] for h in straight.history if h.get("skipped")] if straight.rank == 0
                                      else None)[0],
        "scales": [before[s]["scale"] for s in range(7)] + [after_run["scale"]],
        "lrs": [before[s]["lr"] for s in range(7)],
        "unchanged": {k: all_gather_objects(all(same(before[s][k], before[s + 1][k]) for s in BROKEN))
                      for k in ("params", "master", "moments", "joint", "usage")},
        "changed_when_applied": {k: all_gather_objects(not same(before[2][k], before[3][k]))
                                 for k in ("params", "master", "moments", "joint", "usage")},
        "reasons": [h.get("skip_reason") for h in history if h.get("skipped")],
    }
    # the same run stopped after its step-2 checkpoint (before the overflows), then resumed
    resumed = out / "resumed"
    if straight.rank == 0:
        shutil.copytree(out / "straight", resumed)
        for tag in ("step00000004", "step00000006", "step00000007"):
            shutil.rmtree(resumed / "checkpoints" / tag)
        (resumed / "checkpoints" / "latest_complete").write_text("step00000002\n")
    barrier()
    again = OverflowOnRank1(load_recipe("demo", demo_overrides(shards, **trainer_args)), resumed)
    again.run()
    summary["resumed_bitwise"] = all_gather_objects(same(after_run, states(again)))
    summary["resumed_losses_equal"] = [h["loss"] for h in straight.history] == [h["loss"] for h in again.history] \
        if straight.rank == 0 else None
    return summary


def track(shards: Path, out: Path) -> dict:
    cpu_half.enable()
    losses, finals = {}, {}
    skipped = {}
    for name, cfg in (("fp32", "stage0_fp32.json"), ("fp16", str(out / "fp16_2p10.json")), ("bf16", "zero2_bf16.json")):
        recipe = load_recipe("demo", demo_overrides(shards, steps=5, ds_config=cfg))
        trainer = Trainer(recipe, out / name)
        trainer.run()
        losses[name] = [h["loss"] for h in trainer.history]
        skipped[name] = [h["step"] for h in trainer.history if h.get("skipped")]
        finals[name] = torch.cat([p.detach().float().flatten() for p in trainer.engine.module.parameters()])
    drift = {name: float((f - finals["fp32"]).norm() / finals["fp32"].norm()) for name, f in finals.items()}
    return {"losses": losses, "param_drift": drift, "skipped": skipped}


def precision(shards: Path, out: Path) -> dict:
    """Inside an fp16 engine's forward: the router runs in float32, the MI loss and B(D, E) are float32; and the
    same tied tokens, in batches of other content on each rank, take the same routes on both ranks."""
    cpu_half.enable()
    from mthl_ds.build import build_model
    from mthl_ds.moe.gate import PerDatasetGate, RoutingContext
    from mthl_ds.runtime.engine import build_engine, ep_rank, init_distributed
    init_distributed()
    rank, _ = world()
    recipe = load_recipe("demo", demo_overrides(shards, ds_config="zero2_fp16.json"))
    engine, _, _ = build_engine(build_model(recipe, 2, ep_rank(2)), recipe)
    model = engine.module
    seen = {}
    gate = model.backbone.moe_layers[0].gate
    gate.routers["imagenet"].register_forward_hook(lambda m, a, out: seen.update(router_in=str(a[0].dtype),
                                                                                  logits=str(out.dtype)))
    model.set_dataset("imagenet")
    features = engine(torch.randn(2, 3, 64, 64).half())
    seen.update(features=str(features.dtype), mi=str(gate.losses["mi"].dtype), joint=str(gate.routing_joint.dtype),
                weights=str(gate.routers["imagenet"].proj.weight.dtype))
    context = RoutingContext(dataset="a")
    ties = PerDatasetGate(8, 6, ["a"], {"a": 2}, drop_tokens=False, context=context)
    torch.nn.init.zeros_(ties.routers["a"].proj.weight)
    ties.routers["a"].proj.weight.data[1:4] = 1.0  # a token of ones ties experts 1, 2, 3
    ties._set_ep_group(torch.distributed.group.WORLD)
    others = torch.randn(5 + 3 * rank, 8, generator=torch.Generator().manual_seed(rank))
    tokens = torch.cat([others[:2 * rank], torch.ones(3, 8).half().float(), others[2 * rank:]])
    _, capacity, _, indices, _, gates, _ = ties(tokens)
    tied = slice(2 * rank, 2 * rank + 3)
    seen["tied_routes"] = all_gather_objects(indices[:, tied].tolist())
    seen["tied_gates"] = all_gather_objects(gates[:, tied].tolist())
    seen["capacity"] = all_gather_objects(int(capacity))
    return seen


if __name__ == "__main__":
    mode, shards, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    result = {"overflow": overflow, "track": track, "precision": precision}[mode](shards, out)
    if torch.distributed.get_rank() == 0:
        (out / "summary.json").write_text(json.dumps(result))

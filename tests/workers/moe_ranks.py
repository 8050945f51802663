"""2-rank worker: expert-parallel forward/backward, then MI-buffer training, save and reload.

Writes ``rank{R}.pt`` into the output folder; tests/test_distributed_moe.py compares them.
"""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from mthl_ds.build import build_model
from mthl_ds.config import load_recipe
from mthl_ds.runtime.collectives import all_reduce_mean, world
from mthl_ds.runtime.engine import build_engine, ep_rank, init_distributed

EP_OVERRIDES = ["model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.drop_tokens=false",
                "model.moe.losses={}", "train.ds_config=stage0_fp32.json", "train.ep_size=2", "train.seed=7"]
BUFFER_OVERRIDES = ["model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.losses={mi: 0.1}",
                    "train.ds_config=zero2_fp32.json", "train.ep_size=2", "train.seed=7"]


def global_batch(n=8, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(10, (n,), generator=g)


def per_expert(named, first: int = 0) -> dict:
    """``(name, tensor)`` pairs as a dict of copies, each stacked expert tensor (one bank) cut into its experts,
    named ``...experts.deepspeed_experts.{e}.fc1_weight`` under their global index ``e`` (``first``: this rank's
    first expert), so that ranks holding different experts compare with one process."""
    out = {}
    for name, tensor in named:
        if ".experts.banks." not in name:
            out[name] = tensor.clone()
            continue
        head, tail = name.split(".banks.")
        bank, param = tail.split(".", 1)
        assert bank == "0", f"{name}: one bank expected"
        for e, piece in enumerate(tensor.unbind(0)):
            out[f"{head}.deepspeed_experts.{first + e}.{param}"] = piece.clone()
    return out


def expert_parallel_pass(rank: int, ep_size: int = 2, extra: tuple[str, ...] = ()) -> dict:
    """Half the global batch on each rank through a real engine with ``ep_size``: logits, loss and gradients
    (expert parameters under their global index)."""
    recipe = load_recipe("demo", [*(o for o in EP_OVERRIDES if not o.startswith("train.ep_size")),
                                  f"train.ep_size={ep_size}", *extra])
    model = build_model(recipe, ep_size=ep_size, ep_rank=ep_rank(ep_size))
    engine, _, _ = build_engine(model, recipe)
    images, labels = global_batch()
    half = slice(4 * rank, 4 * rank + 4)
    engine.module.set_dataset("imagenet")
    logits = engine(images[half])
    loss = F.cross_entropy(logits, labels[half])
    engine.backward(loss)
    local = recipe.model.moe.num_experts // ep_size
    grads = per_expert(((n, p.grad) for n, p in engine.module.named_parameters() if p.grad is not None),
                       ep_rank(ep_size) * local)
    return {"logits": logits.detach(), "loss": loss.detach(), "grads": grads}


def buffer_pass(rank: int, ckpt: Path) -> dict:
    recipe = load_recipe("demo", BUFFER_OVERRIDES)
    model = build_model(recipe, ep_size=2, ep_rank=ep_rank(2))
    engine, _, _ = build_engine(model, recipe)
    for step in range(3):
        images, labels = global_batch(4, seed=100 + 10 * step + rank)  # different data on each rank
        engine.module.set_dataset(["imagenet", "ade20k", "imagenet"][step])
        feats = engine.module.backbone(images)
        loss = sum(f.mean() for f in feats) + engine.module.backbone.router_loss()
        engine.module.backbone.update_routing_buffers(all_reduce_mean)
        engine.backward(loss)
        engine.step()
    buffers = {n: b.clone() for n, b in engine.module.named_buffers() if n.endswith("routing_joint")}
    engine.save_checkpoint(str(ckpt), tag="step3")
    fresh, _, _ = build_engine(build_model(recipe, ep_size=2, ep_rank=ep_rank(2)), recipe)
    fresh.load_checkpoint(str(ckpt), tag="step3")
    loaded = {n: b.clone() for n, b in fresh.module.named_buffers() if n.endswith("routing_joint")}
    return {"buffers": buffers, "loaded": loaded}


def main(out: Path, mode: str = "capacity") -> None:
    """``capacity``: the expert-parallel and MI-buffer passes; ``dropless``: dropless dispatch with ep_size 1
    and 2."""
    init_distributed()
    rank, world_size = world()
    assert world_size == 2, world_size
    if mode == "dropless":
        result = {f"dropless_ep{ep}": expert_parallel_pass(rank, ep, ("model.moe.dispatch=dropless",))
                  for ep in (1, 2)}
    else:
        result = {"ep": expert_parallel_pass(rank), "buffer": buffer_pass(rank, out / "ckpt")}
    torch.save(result, out / f"rank{rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:])

"""The embedded demo: 2 CPU ranks under the deepspeed launcher, ZeRO 2, LAMB, expert parallelism 2.

For now it trains the demo recipe's classification datasets on a small learnable world of random
tensors (each class a fixed random image plus noise) and reports loss and accuracy against chance.
"""
from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mthl_ds.config import load_recipe


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out: Path, ranks: int = 2, overrides: tuple[str, ...] = ()) -> int:
    """Run the demo worker on ``ranks`` local processes with the deepspeed launcher."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port",
           str(free_port()), "--module", "mthl_ds.demo", "--out", str(out)]
    for o in overrides:
        cmd += ["--set", o]
    return subprocess.call(cmd)


def prototype_batch(gen: torch.Generator, prototypes: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.randint(len(prototypes), (batch,), generator=gen)
    images = prototypes[labels] + 0.5 * torch.randn(batch, *prototypes.shape[1:], generator=gen)
    return images, labels


def worker(out: Path, overrides: list[str]) -> None:
    from mthl_ds.engine import all_reduce_mean, build_engine, ep_rank, init_distributed, world
    from mthl_ds.models.mthl import build_model

    recipe = load_recipe("demo", overrides)
    init_distributed()
    rank, world_size = world()
    model = build_model(recipe, ep_size=recipe.train.ep_size, ep_rank=ep_rank(recipe.train.ep_size))
    engine, _, _ = build_engine(model, recipe)
    size = recipe.model.img_size
    datasets = {n: d for n, d in recipe.datasets.items() if d.task == "classification"}
    prototypes = {n: torch.randn(d.num_classes, 3, size, size, generator=torch.Generator().manual_seed(i))
                  for i, (n, d) in enumerate(datasets.items())}
    gen = torch.Generator().manual_seed(recipe.train.seed * 100 + rank)
    history = []
    start = time.time()
    for step in range(recipe.train.steps):
        name = list(datasets)[step % len(datasets)]
        images, labels = prototype_batch(gen, prototypes[name], datasets[name].batch_size)
        engine.module.set_dataset(name)
        logits = engine(images)
        task_loss = F.cross_entropy(logits, labels)
        loss = task_loss + engine.module.backbone.router_loss()
        engine.module.backbone.update_routing_buffers(all_reduce_mean)
        engine.backward(loss)
        engine.step()
        acc = float((logits.argmax(1) == labels).float().mean())
        history.append({"step": step, "dataset": name, "loss": float(task_loss), "acc": acc,
                        **engine.module.backbone.router_loss_terms()})
        if rank == 0:
            print(f"step {step + 1}/{recipe.train.steps} {name} loss {float(task_loss):.3f} acc {acc:.2f}", flush=True)
    if rank == 0:
        tail = history[-5:]
        summary = {"ranks": world_size, "steps": recipe.train.steps, "seconds": round(time.time() - start, 1),
                   "first_loss": history[0]["loss"], "final_loss": sum(h["loss"] for h in tail) / len(tail),
                   "final_acc": sum(h["acc"] for h in tail) / len(tail),
                   "chance_acc": 1 / min(d.num_classes for d in datasets.values())}
        (out / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
        (out / "final_metrics.json").write_text(json.dumps(summary, indent=2))
        print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--local_rank", type=int, default=None)  # passed by the deepspeed launcher
    args = parser.parse_args()
    worker(args.out, args.set)

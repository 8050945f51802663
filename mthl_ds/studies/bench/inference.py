"""Batch dependence and eval images/s of the MoE forward, per dispatch choice:

- ``drop``: DeepSpeed's eval capacity (``eval_capacity_factor``), routes over it dropped, every slot computed;
- ``filled``: no route dropped (capacity = the busiest expert's count), each expert on its filled slots (default);
- ``batched``: no route dropped, every slot of that capacity computed in two batched matmuls.

    python -m mthl_ds.studies.bench.inference demo 16          # every dataset at its recipe size, batch 16
    python -m mthl_ds.studies.bench.inference mthl_swin_t 8 --datasets imagenet

Prints per choice and dataset: max |output of image 0 alone - its output first in the batch| next to max |output|,
and images/s of the batch (median of ``--repeats`` forwards after a warm one). Random-init model (the recipe's seed).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from mthl_ds.build import build_model
from mthl_ds.config import load_recipe
from mthl_ds.geometry import input_shape
from mthl_ds.moe.layer import MoEMlp

FILLED = MoEMlp.run_filled_slots


def every_slot(layer: MoEMlp, dispatched: torch.Tensor, filled: torch.Tensor) -> torch.Tensor:
    experts, capacity, dim = dispatched.shape
    return layer.mlps(dispatched.view(1, experts, capacity, dim)).view(experts, capacity, dim)


def flat_outputs(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output.flatten(1)
    return torch.cat([output[k].flatten(1) for k in ("cls_logits", "bbox_regression", "logits") if k in output], 1)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe")
    parser.add_argument("batch", type=int)
    parser.add_argument("--datasets", help="comma-separated (default: all of the recipe's)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    base = load_recipe(args.recipe)
    names = args.datasets.split(",") if args.datasets else list(base.datasets)
    for choice, drop, run in (("drop", True, every_slot), ("filled", False, FILLED), ("batched", False, every_slot)):
        MoEMlp.run_filled_slots = run
        model = build_model(load_recipe(args.recipe, [f"model.moe.eval_drop_tokens={str(drop).lower()}"])).eval()
        gen = torch.Generator().manual_seed(0)
        for name in names:
            size = input_shape(base.datasets[name].task, base.datasets[name].size)
            x = torch.randn(args.batch, 3, *size, generator=gen)
            model.set_dataset(name)
            with torch.no_grad():
                alone = flat_outputs(model(x[:1]))
                model(x)
                times = []
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    together = flat_outputs(model(x))
                    times.append(time.perf_counter() - start)
            diff = float((together[0] - alone[0]).abs().max())
            print(f"{args.recipe} {choice:<8} {name:<10} {size[0]}x{size[1]} batch {args.batch}: "
                  "max |alone - in batch| "
                  f"{diff:.3g} (max |output| {float(alone.abs().max()):.3g}), "
                  f"{args.batch / statistics.median(times):.1f} images/s", flush=True)
    MoEMlp.run_filled_slots = FILLED


if __name__ == "__main__":
    main()

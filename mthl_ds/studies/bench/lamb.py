"""LAMB step time: our per-tensor LAMB on whole tensors (ZeRO 0) and on one flat ZeRO partition, against
timm's LAMB, on Swin-T's parameters (one process, one thread; the partition holds every tensor)."""
from __future__ import annotations

import statistics
import time

import timm
import timm.optim
import torch

from mthl_ds.runtime.optim import Lamb, PartitionLayout


def run(model_name: str = "swin_tiny_patch4_window7_224", repeats: int = 5) -> list[dict]:
    torch.set_num_threads(1)
    source = [p.detach() for p in timm.create_model(model_name, num_classes=0).parameters()]
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(p.shape, generator=gen) * 1e-3 for p in source]

    def params():
        out = [torch.nn.Parameter(p.clone()) for p in source]
        for p, g in zip(out, grads):
            p.grad = g
        return out

    whole, reference = params(), params()
    flat = torch.nn.Parameter(torch.cat([p.flatten() for p in source]))
    flat.grad = torch.cat([g.flatten() for g in grads])
    partitioned = Lamb([flat], lr=1e-3, weight_decay=0.05)
    partitioned.layouts[flat] = PartitionLayout([p.numel() for p in source], torch.arange(len(source)), len(source))
    optimizers = {"mthl_ds Lamb, whole tensors (ZeRO 0)": Lamb(whole, lr=1e-3, weight_decay=0.05),
                  "mthl_ds Lamb, flat partition (ZeRO 1/2)": partitioned,
                  "timm Lamb (foreach), whole tensors": timm.optim.Lamb(reference, lr=1e-3, weight_decay=0.05,
                                                                        max_grad_norm=None)}
    rows = []
    numel = sum(p.numel() for p in source)
    for name, optimizer in optimizers.items():
        optimizer.step()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            optimizer.step()
            times.append(time.perf_counter() - start)
        rows.append({"benchmark": f"LAMB step, {model_name} ({numel / 1e6:.1f}M params)", "candidate": name,
                     "median_ms": round(1e3 * statistics.median(times), 1),
                     "spread_ms": f"{1e3 * min(times):.0f}-{1e3 * max(times):.0f}"})
    return rows

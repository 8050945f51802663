"""``mthl-ds bench step``: MTHL against its dense twin MTHL.D at the recipe's input sizes (ImageNet 224, COCO
800x1344, ADE20K 512 for the paper's recipes), one training forward and backward (backbone, head, task and router
losses) per dataset and precision, in one process, the candidates alternating within each round (each round starting
with the next one).

Both dispatch modes of MTHL are timed against the same MTHL.D: ``capacity`` (the paper's) and ``dropless``, with
the same weights; where the capacity path runs its experts looped (one CPU rank, ``grouped.capacity_backend``),
also the capacity path with its experts batched, the form it takes elsewhere. Each row gives the median time ratio
to MTHL.D over the rounds (the first round warms up), its spread, the FLOPs ratio (torch's counter) and the share
of routes the capacity dropped. The paper's premise is a FLOPs ratio of about 1.01 (Swin-T: 9.08 vs 8.98 backbone
GFLOPs per image); the target is a time ratio of at most 1.15 for every dataset.

On the CPU the batches are small (ImageNet 8, COCO 1, ADE20K 2) so that a round takes seconds; with CUDA they are
the paper's per-GPU batches (64, 2, 2). ``--batches`` sets them per dataset (the paper's on the CPU: a round of
1-1.5 min in fp32, and about 23 GiB at its peak). bf16 and fp16 cast the parameters as DeepSpeed's engines
do (buffers stay float32). The optimizer step is left out: it is the same for both models' shared parts and would
only dilute the ratio.
"""
from __future__ import annotations

import statistics
from typing import Callable, Optional

import torch

from mthl_ds.build import build_model, training_loss
from mthl_ds.config import load_recipe
from mthl_ds.models.counting import count_flops
from mthl_ds.moe.grouped import capacity_backend
from mthl_ds.runtime.device import to_device
from mthl_ds.studies.bench.common import timed
from mthl_ds.studies.memory import cast_parameters
from mthl_ds.studies.model_info import dense_twin
from mthl_ds.tasks import fake_batch

CPU_BATCHES = {"imagenet": 8, "coco": 1, "ade20k": 2}
CUDA_BATCHES = {"imagenet": 64, "coco": 2, "ade20k": 2}
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TARGET = 1.15
CANDIDATES = ("MTHL capacity", "MTHL dropless", "MTHL.D")
BATCHED = "MTHL capacity, batched experts"  # also timed where the capacity experts run looped (the CPU)
COLUMNS = ["dataset", "batch", "precision", "candidate", "ms", "ratio", "spread", "flops_ratio", "dropped", "target",
           "met"]


def fwd_bwd(model: torch.nn.Module, recipe, name: str, batch: dict) -> Callable[[], None]:
    def step():
        model.zero_grad(set_to_none=True)
        model.set_dataset(name)
        training_loss(model, recipe, name, batch).loss.backward()
    return step


def run(recipe: str = "mthl_swin_t", precisions: tuple[str, ...] = ("fp32", "bf16"), repeats: int = 3,
        batches: Optional[dict[str, int]] = None, device: Optional[str] = None, progress=print) -> list[dict]:
    """Rows for every dataset of ``recipe`` and precision; ``batches`` per dataset, over the defaults (the CPU's or
    the paper's per-GPU batches, see the module docstring; a dataset named in neither keeps the recipe's)."""
    unknown = set(precisions) - set(PRECISIONS)
    if unknown:
        raise ValueError(f"unknown precision(s) {sorted(unknown)}; choose from {sorted(PRECISIONS)}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    batches = batches or {}
    recipes = {"MTHL capacity": load_recipe(recipe, ["model.moe.dispatch=capacity"]),
               "MTHL dropless": load_recipe(recipe, ["model.moe.dispatch=dropless"])}
    recipes["MTHL.D"] = dense_twin(recipes["MTHL capacity"])
    unknown = set(batches) - set(recipes["MTHL.D"].datasets)
    if unknown:
        raise ValueError(f"batch sizes for {sorted(unknown)}, which recipe {recipe!r} does not train; its datasets: "
                         f"{sorted(recipes['MTHL.D'].datasets)}")
    batches = {**(CUDA_BATCHES if device.type == "cuda" else CPU_BATCHES), **batches}
    candidates = CANDIDATES
    if capacity_backend(device, 1) == "looped":
        candidates = (CANDIDATES[0], BATCHED, *CANDIDATES[1:])
        recipes[BATCHED] = recipes["MTHL capacity"]
    torch.manual_seed(0)
    models = {k: build_model(recipes[k]).to(device).train() for k in candidates}
    for k in candidates:
        if k not in ("MTHL capacity", "MTHL.D"):
            models[k].load_state_dict(models["MTHL capacity"].state_dict())
    for layer in models[BATCHED].backbone.moe_layers if BATCHED in models else []:
        layer.capacity_experts = "batched"
    rows = []
    for precision in precisions:
        dtype = PRECISIONS[precision]
        for model in models.values():
            cast_parameters(model, dtype)
        for name, d in recipes["MTHL.D"].datasets.items():
            size = batches.get(name, d.batch_size)
            batch = to_device(fake_batch(recipes["MTHL.D"], name, batch_size=size), device, dtype)
            steps = {k: fwd_bwd(m, recipes[k], name, batch) for k, m in models.items()}
            flops = {k: count_flops(step) for k, step in steps.items()}
            times: dict[str, list[float]] = {k: [] for k in steps}
            for round_ in range(repeats + 1):  # the first round warms up; each round starts with another candidate
                for k in candidates[round_ % len(candidates):] + candidates[:round_ % len(candidates)]:
                    seconds = timed(steps[k])
                    if round_:
                        times[k].append(seconds)
            dropped = float(models["MTHL capacity"].backbone.routes_dropped())
            for k in candidates:
                ratios = [t / b for t, b in zip(times[k], times["MTHL.D"])]
                ratio = statistics.median(ratios)
                moe = k != "MTHL.D"
                rows.append({"dataset": name, "batch": size, "precision": precision, "candidate": k,
                             "ms": round(1e3 * statistics.median(times[k]), 1), "ratio": round(ratio, 3),
                             "spread": f"[{min(ratios):.2f}, {max(ratios):.2f}]" if moe else "",
                             "flops_ratio": round(flops[k] / flops["MTHL.D"], 3),
                             "dropped": (f"{100 * dropped:.1f}%" if "capacity" in k else "0.0%") if moe else "",
                             "target": f"<= {TARGET}" if moe else "baseline", "met": ratio <= TARGET if moe else None})
                progress(rows[-1])
    return rows

"""One MoE MLP layer, side by side at the Swin-T stage widths (96, 192, 384, 768) with the tokens of the paper's
per-GPU batches (ImageNet 64 x 224, COCO 2 x 800x1344, ADE20K 2 x 512; each stage a quarter of the one before),
forward plus backward of:

- ``capacity``: our layer with the paper's dispatch (capacity factor 1.0, overflow dropped; its experts'
  backend, ``grouped.capacity_backend``, in the note);
- ``dropless``: our layer sorting the routes by expert, no route dropped (``mthl_ds.moe.grouped``'s backend);
- ``deepspeed``: DeepSpeed's own ``MoE`` layer (its ``TopKGate`` and ``MOELayer``, capacity factor 1.0);
- ``dense``: the FLOPs-matched dense MLP (hidden 4 d; the experts' hidden is 4 d / K), the baseline;
- ``gate``: the capacity layer's gate alone (routes, capacity slots and the MI loss), its share of the layer.

E = 12 experts, K = 4, as the paper. Inputs are random, so routing is near uniform and the routes dropped by the
capacity layers are those of a balanced router (a trained one drops more). On the CPU the token counts are
scaled down by default (``scale`` 1/4, printed in each row; ``mthl-ds bench moe --scale 1`` runs the paper's
counts, about 100 s on the 2-core CPU). Each time is the median of ``repeats`` rounds, the candidates alternating
within a round; ratios are to the dense MLP of the same round.
"""
from __future__ import annotations

import math
import statistics
from typing import Callable

import torch
from deepspeed.moe.layer import MoE
from timm.layers import Mlp

from mthl_ds.models.counting import count_flops
from mthl_ds.moe.gate import PerDatasetGate
from mthl_ds.moe.grouped import backend, capacity_backend
from mthl_ds.moe.layer import MoEMlp
from mthl_ds.studies.bench.common import timed

WIDTHS = (96, 192, 384, 768)
BATCH_TOKENS = {"imagenet": 64 * 56 * 56, "coco": 2 * 200 * 336, "ade20k": 2 * 128 * 128}  # stage 1, per GPU
EXPERTS, TOP_K = 12, 4
COLUMNS = ["dataset", "width", "tokens", "candidate", "ms", "ratio", "flops_ratio", "dropped", "note"]


def ours(dim: int, dispatch: str) -> MoEMlp:
    gate = PerDatasetGate(dim, EXPERTS, ["bench"], {"bench": TOP_K}, capacity_factor=1.0,
                          drop_tokens=dispatch == "capacity", loss_coefs={"mi": 0.01})
    gate.context.dataset = "bench"
    return MoEMlp(dim, 4 * dim // TOP_K, EXPERTS, gate, dispatch=dispatch)


def deepspeed_layer(dim: int) -> MoE:
    return MoE(hidden_size=dim, expert=Mlp(dim, 4 * dim // TOP_K), num_experts=EXPERTS, ep_size=1, k=TOP_K,
               capacity_factor=1.0, eval_capacity_factor=1.0, min_capacity=4, use_rts=False)


def fwd_bwd(module: torch.nn.Module, x: torch.Tensor, first_output: bool = False) -> Callable[[], None]:
    def step():
        module.zero_grad(set_to_none=True)
        out = module(x)
        (out[0] if first_output else out).float().sum().backward()
    return step


def gate_fwd_bwd(gate: PerDatasetGate, x: torch.Tensor) -> Callable[[], None]:
    def step():
        gate.zero_grad(set_to_none=True)
        (gate(x).gates.float().sum() + gate.weighted_loss()).backward()
    return step


def dropped_share(counts: torch.Tensor, tokens: int) -> float:
    """Share of the K x S routes over capacity (capacity factor 1.0, min capacity 4)."""
    capacity = max(math.ceil(tokens / EXPERTS * TOP_K), 4)
    return float((counts - capacity).clamp(min=0).sum()) / (TOP_K * tokens)


def shape_rows(dataset: str, width: int, tokens: int, dtype: torch.dtype, device: str, repeats: int,
               scale: float) -> list[dict]:
    x = torch.randn(tokens, width, device=device, dtype=dtype, requires_grad=True)
    layers = {"capacity": ours(width, "capacity"), "dropless": ours(width, "dropless"),
              "deepspeed": deepspeed_layer(width), "dense": Mlp(width, 4 * width)}
    for layer in layers.values():
        layer.to(device=device, dtype=dtype).train()
    steps = {name: fwd_bwd(layer, x, first_output=name == "deepspeed") for name, layer in layers.items()}
    steps["gate"] = gate_fwd_bwd(layers["capacity"].gate, x)
    flops = {name: count_flops(step) for name, step in steps.items()}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_ in range(repeats + 1):  # the first round warms up
        for name, step in steps.items():
            seconds = timed(step)
            if round_:
                times[name].append(seconds)
    ratios = {name: statistics.median(t / d for t, d in zip(times[name], times["dense"])) for name in steps}
    with torch.no_grad():  # DeepSpeed's layer returns its per-expert counts
        deepspeed_counts = layers["deepspeed"](x)[2]
    dropped = {"capacity": dropped_share(layers["capacity"].gate.counts, tokens), "dropless": 0.0,
               "deepspeed": dropped_share(deepspeed_counts, tokens)}
    note = {"capacity": f"experts: {capacity_backend(x.device, 1)}", "dropless": f"experts: {backend(x.device, dtype)}",
            "dense": "baseline", "gate": "the capacity gate"}
    return [{"dataset": dataset, "width": width, "tokens": f"{tokens} (x{scale:g})" if scale != 1 else tokens,
             "candidate": name, "ms": round(1e3 * statistics.median(times[name]), 2), "ratio": round(ratios[name], 3),
             "flops_ratio": round(flops[name] / flops["dense"], 3),
             "dropped": f"{100 * dropped[name]:.1f}%" if name in dropped else "", "note": note.get(name, "")}
            for name in steps]


def run(repeats: int = 5, scale: float | None = None, dtype: torch.dtype = torch.float32,
        device: str | None = None, datasets: tuple[str, ...] = tuple(BATCH_TOKENS)) -> list[dict]:
    """Every (dataset, stage width) row; ``scale`` multiplies the token counts (default: 1 on CUDA, 1/4 on
    the CPU)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    scale = scale if scale is not None else (1.0 if device == "cuda" else 1 / 4)
    rows = []
    for dataset in datasets:
        for stage, width in enumerate(WIDTHS):
            tokens = max(EXPERTS, round(BATCH_TOKENS[dataset] / 4 ** stage * scale))
            rows += shape_rows(dataset, width, tokens, dtype, device, repeats, scale)
    return rows

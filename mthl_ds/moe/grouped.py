"""A rank's experts on groups of rows of varying size: rows sorted by expert, ``counts[e]`` rows for expert e.

Two ways, chosen per device and dtype the first time they are met, and logged once:

- ``grouped_mm``: ``torch._grouped_mm`` (one kernel per linear layer for all experts; what torchtitan and
  Megatron-Core run), on CUDA where a probe call in that dtype succeeds (bf16 on sm90 GPUs). The CPU has the
  op too (bf16, fp16) but as a reference kernel slower than the loop. Each expert keeps its own parameters:
  they are stacked per call.
- ``looped``: each expert's MLP on its slice (the counts are read on the host once per call). V100s (fp16, no
  grouped kernels) run this way.

Both compute ``fc2(act(fc1(x)))`` of timm's ``Mlp`` (its dropouts are 0 and its norm is an identity here).
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch
from torch import Tensor, nn

log = logging.getLogger("mthl_ds.moe")
CHOICES: dict[tuple[str, torch.dtype], str] = {}


def grouped_mm_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` runs (forward and backward) on ``device`` in ``dtype``: a probe on small
    tensors, since support depends on the torch version, the GPU generation and the dtype."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        x = torch.ones(8, 16, device=device, dtype=dtype, requires_grad=True)
        w = torch.ones(2, 16, 16, device=device, dtype=dtype, requires_grad=True)
        out = torch._grouped_mm(x, w, offs=torch.tensor([4, 8], device=device, dtype=torch.int32))
        out.square().sum().backward()  # a materialised gradient, as the layer's gelu and gate products give
        return True
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def backend(device: torch.device, dtype: torch.dtype) -> str:
    """``grouped_mm`` or ``looped`` for this device and dtype (module docstring), decided once and logged."""
    key = (str(device), dtype)
    if key not in CHOICES:  # the CPU's grouped_mm is a reference kernel, slower than the loop
        CHOICES[key] = "grouped_mm" if device.type == "cuda" and grouped_mm_works(device, dtype) else "looped"
        log.info("dropless MoE experts on %s in %s: %s", device, dtype, CHOICES[key])
    return CHOICES[key]


def linear_grouped(x: Tensor, offsets: Tensor, rows_expert: Tensor, layers: Sequence[nn.Linear]) -> Tensor:
    weight = torch.stack([layer.weight for layer in layers]).transpose(1, 2)  # [E, in, out]
    bias = torch.stack([layer.bias for layer in layers])
    return torch._grouped_mm(x, weight.to(x.dtype), offs=offsets) + bias.to(x.dtype)[rows_expert]


def run_groups(mlps: Sequence[nn.Module], x: Tensor, counts: Tensor, choice: str | None = None) -> Tensor:
    """``[rows, d] -> [rows, d]``: rows ``sum(counts[:e]) ..`` through expert ``e``. ``choice`` forces a backend
    (tests, benchmarks); default: :func:`backend`."""
    choice = choice or backend(x.device, x.dtype)
    if choice == "grouped_mm":
        offsets = counts.cumsum(0).to(torch.int32)
        rows_expert = torch.repeat_interleave(torch.arange(len(mlps), device=x.device), counts, output_size=len(x))
        hidden = mlps[0].act(linear_grouped(x, offsets, rows_expert, [m.fc1 for m in mlps]))
        return linear_grouped(hidden, offsets, rows_expert, [m.fc2 for m in mlps])
    if choice != "looped":
        raise ValueError(f"unknown grouped-expert backend {choice!r}; use grouped_mm or looped")
    # every expert runs, an empty one on 0 rows: its parameters get a zero gradient, as in the capacity path
    return torch.cat([mlp(part) for mlp, part in zip(mlps, x.split(counts.tolist()))])

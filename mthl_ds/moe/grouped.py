"""A rank's experts on groups of rows of varying size: rows sorted by expert, ``counts[e]`` rows for expert e.

Two ways, chosen per device and dtype the first time they are met, and logged once:

- ``grouped_mm``: ``torch._grouped_mm`` (one kernel per linear layer for all experts; what torchtitan and
  Megatron-Core run), on CUDA where a probe call in that dtype succeeds (bf16 on sm90 GPUs). The CPU has the
  op too (bf16, fp16) but as a reference kernel slower than the loop.
- ``looped``: each expert's MLP on its rows (the counts are read on the host once per call). V100s (fp16, no
  grouped kernels) run this way. Where the rows' tokens and gates are at hand (one expert-parallel rank),
  :class:`LoopedExperts` also gathers each expert's rows and adds its gated outputs onto their tokens as it goes.
  On the CPU in bf16 / fp16 each expert's rows are padded to one of a few sizes (:func:`padded_count`).

Both compute ``fc2(act(fc1(x)))`` of timm's ``Mlp`` (its dropouts are 0 and its norm is an identity here) with
the experts' stacked tensors (:class:`mthl_ds.moe.experts.StackedMlps`).

The capacity path's experts, C slots each, also run as one :class:`LoopedExperts` in training on one CPU rank
(:func:`capacity_backend`): C is known without reading the device, and nothing is padded.
"""
from __future__ import annotations

import logging
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mthl_ds.moe.experts import StackedMlps

log = logging.getLogger("mthl_ds.moe")
CHOICES: dict[tuple[str, torch.dtype], str] = {}


def grouped_mm_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` runs (forward and backward) on ``device`` in ``dtype``: a probe on small
    tensors, since support depends on the torch version, the GPU generation and the dtype. Its groups are as
    routing makes them: of sizes that are not multiples of 8, one of them empty; its weights are laid out as
    :func:`linear_grouped` lays them out (each expert's ``[out, in]`` weight, transposed)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        x = torch.ones(8, 16, device=device, dtype=dtype, requires_grad=True)
        w = torch.ones(3, 24, 16, device=device, dtype=dtype, requires_grad=True)
        out = torch._grouped_mm(x, w.transpose(1, 2), offs=torch.tensor([3, 3, 8], device=device, dtype=torch.int32))
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


def linear_grouped(x: Tensor, offsets: Tensor, rows_expert: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """Rows of expert e through ``weight[e]`` ``[out, in]`` and ``bias[e]``, in one grouped matmul."""
    return torch._grouped_mm(x, weight.transpose(1, 2).to(x.dtype), offs=offsets) + bias.to(x.dtype)[rows_expert]


def run_groups(mlps: StackedMlps, x: Tensor, counts: Tensor, choice: str | None = None) -> Tensor:
    """``[rows, d] -> [rows, d]``: rows ``sum(counts[:e]) ..`` through expert ``e``. ``choice`` forces a backend
    (tests, benchmarks); default: :func:`backend`."""
    choice = choice or backend(x.device, x.dtype)
    if choice == "grouped_mm":
        w1, b1, w2, b2 = mlps.stacks()
        offsets = counts.cumsum(0).to(torch.int32)
        rows_expert = torch.repeat_interleave(torch.arange(len(w1), device=x.device), counts, output_size=len(x))
        hidden = mlps.act(linear_grouped(x, offsets, rows_expert, w1, b1))
        return linear_grouped(hidden, offsets, rows_expert, w2, b2)
    if choice != "looped":
        raise ValueError(f"unknown grouped-expert backend {choice!r}; use grouped_mm or looped")
    # every expert runs, an empty one on 0 rows: its tensors get a zero gradient, as in the capacity path
    return torch.cat([mlps.run(expert, pad_rows(part))[:len(part)]
                      for expert, part in zip(mlps.per_expert(), x.split(counts.tolist()))])


def padded_count(rows: int, device: torch.device, dtype: torch.dtype) -> int:
    """How many rows a looped expert runs for its ``rows``: on the CPU in bf16 / fp16 the next of 8 sizes per
    octave (a multiple of 16, at most 1/8 more rows from 128 on), elsewhere ``rows``. In these dtypes oneDNN
    builds a matmul kernel for each new shape, and the experts' row counts change at every step: at Swin-T's
    ImageNet shapes their forward and backward took 1.8-3.3x as long as at fixed counts, and 0.9-1.2x at these
    sizes (README, "Dropless dispatch"). The padded rows are zeros whose outputs are never used, so they add
    nothing to any gradient."""
    if rows == 0 or device.type != "cpu" or dtype not in (torch.bfloat16, torch.float16):
        return rows
    step = max(16, 1 << max(0, rows.bit_length() - 4))
    return -(-rows // step) * step


def pad_rows(rows: Tensor) -> Tensor:
    """``rows`` with zero rows appended up to :func:`padded_count` (``rows`` itself where nothing is added)."""
    padding = padded_count(len(rows), rows.device, rows.dtype) - len(rows)
    return F.pad(rows, (0, 0, 0, padding)) if padding else rows


def combine(outputs: Tensor, source: Tensor, gates: Tensor, shape: torch.Size) -> Tensor:
    """``[rows, d] -> shape``: each row's output weighted by its gate and added onto token ``source[row]``, in
    float32 or wider (as DeepSpeed combines half-precision outputs), returned in the outputs' dtype."""
    wide = torch.promote_types(outputs.dtype, torch.float32)
    weighted = outputs * gates.to(wide).unsqueeze(1)  # computed in (and returned as) the wide dtype: no cast copy
    return torch.zeros(shape, dtype=wide, device=outputs.device).index_add_(0, source, weighted).to(outputs.dtype)


def run_and_combine(mlps: StackedMlps, tokens: Tensor, source: Tensor, gates: Tensor, counts: Tensor,
                    choice: str | None = None) -> Tensor:
    """``[S, d] -> [S, d]``: ``combine(run_groups(mlps, tokens[source], counts), source, gates)``, the rows in
    expert order (``counts[e]`` rows for expert e). The looped backend runs it as one :class:`LoopedExperts`."""
    choice = choice or backend(tokens.device, tokens.dtype)
    if choice != "looped":
        return combine(run_groups(mlps, tokens.index_select(0, source), counts, choice), source, gates, tokens.shape)
    return looped_combine(mlps, tokens, source, gates, counts.tolist(), pad=True)


def looped_combine(mlps: StackedMlps, tokens: Tensor, source: Tensor, gates: Tensor, counts: list[int],
                   pad: bool) -> Tensor:
    """:class:`LoopedExperts` on ``mlps``: ``counts[e]`` rows (tokens ``source``, weights ``gates``) for expert e,
    each padded to :func:`padded_count` rows if ``pad`` (row counts that change from call to call)."""
    return LoopedExperts.apply(tokens, source, gates, counts, mlps.act, pad, *mlps.stacks())


def capacity_backend(device: torch.device, ep_size: int) -> str:
    """How the capacity path runs a rank's experts on its ``[E, C, d]`` slots in training: ``looped`` (one
    :class:`LoopedExperts` over C rows per expert, which reads no count from the device) on the CPU with one
    expert-parallel rank, where it is faster than the batched form on large layers (at the paper's batches
    the training step takes 0.4-0.6 of its time; README, "Dropless dispatch"), up to a third slower on small
    ones; ``batched`` (two ``bmm`` per linear layer over the stacked slots) elsewhere: one kernel per layer on a
    GPU, and the form the all-to-all of several expert-parallel ranks exchanges."""
    return "looped" if device.type == "cpu" and ep_size == 1 else "batched"


class LoopedExperts(torch.autograd.Function):
    """:func:`run_and_combine` with the experts one by one: expert e gathers its rows, runs its MLP, weights the
    outputs by their gates and adds them onto their tokens, and backward does the same in reverse, each step on
    rows still in cache. Against the composition of gather, :func:`run_groups` and :func:`combine` it skips the
    concatenation of the experts' outputs (and of their input gradients) and the separate passes over all rows
    that weight outputs and gradients. The same values: outputs and gradients equal the composition's to rounding.

    Apply as ``LoopedExperts.apply(tokens, source, gates, counts, act, pad, w1, b1, w2, b2)`` with ``counts`` a
    list of ints, ``pad`` whether each expert's rows are padded (:func:`pad_rows`) and the experts' stacked
    tensors (``StackedMlps.stacks()``).
    """

    @staticmethod
    def forward(ctx, tokens: Tensor, source: Tensor, gates: Tensor, counts: list[int], act: nn.Module, pad: bool,
                *params: Tensor) -> Tensor:
        wide = torch.promote_types(tokens.dtype, torch.float32)  # the sums, as in combine()
        out = torch.zeros(tokens.shape, dtype=wide, device=tokens.device)
        saved = []
        for e, (src, gate) in enumerate(zip(source.split(counts), gates.split(counts))):
            w1, b1, w2, b2 = (p[e] for p in params)
            x = tokens.index_select(0, src)
            x = pad_rows(x) if pad else x
            hidden = torch.addmm(b1, x, w1.t())
            activated = act(hidden)
            y = torch.addmm(b2, activated, w2.t())
            out.index_add_(0, src, y[:len(src)] * gate.to(wide).unsqueeze(1))  # wide, as in combine()
            saved += [x, hidden, activated, y]
        ctx.counts, ctx.act = counts, act
        ctx.save_for_backward(source, gates, *params, *saved)
        return out.to(tokens.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        source, gates, *rest = ctx.saved_tensors
        params, saved = rest[:4], rest[4:]
        need_tokens, need_gates, need_params = ctx.needs_input_grad[0], ctx.needs_input_grad[2], any(
            ctx.needs_input_grad[6:])
        wide = torch.promote_types(grad.dtype, torch.float32)
        grad_wide = grad.to(wide)
        grad_tokens = torch.zeros(grad.shape, dtype=grad.dtype, device=grad.device) if need_tokens else None
        grad_gates, grad_params = [], []
        for e, (src, gate) in enumerate(zip(source.split(ctx.counts), gates.split(ctx.counts))):
            w1, b1, w2, b2 = (p[e] for p in params)
            x, hidden, activated, y = saved[4 * e:4 * e + 4]
            grad_y = grad_wide.index_select(0, src)
            if need_gates:
                grad_gates.append((grad_y * y[:len(src)]).sum(1).to(gates.dtype))  # grad_y is wide
            grad_y = (grad_y * gate.to(wide).unsqueeze(1)).to(y.dtype)
            grad_y = F.pad(grad_y, (0, 0, 0, len(x) - len(src))) if len(x) > len(src) else grad_y  # padded rows
            grad_hidden = activation_backward(ctx.act, grad_y @ w2, hidden)
            if need_params:
                grad_params.append((grad_hidden.t() @ x, grad_hidden.sum(0), grad_y.t() @ activated, grad_y.sum(0)))
            if need_tokens:
                grad_tokens.index_add_(0, src, (grad_hidden @ w1)[:len(src)])
        return (grad_tokens, None, torch.cat(grad_gates) if need_gates else None, None, None, None,
                *([torch.stack(g) for g in zip(*grad_params)] if need_params else [None] * 4))


def activation_backward(act: nn.Module, grad: Tensor, hidden: Tensor) -> Tensor:
    """The gradient at ``hidden`` of ``act(hidden)`` given ``grad`` at its output: GELU's own kernel, any other
    activation through autograd on a recomputation."""
    if isinstance(act, nn.GELU):
        return torch.ops.aten.gelu_backward(grad, hidden, approximate=act.approximate)
    with torch.enable_grad():
        leaf = hidden.detach().requires_grad_()
        return torch.autograd.grad(act(leaf), leaf, grad)[0]

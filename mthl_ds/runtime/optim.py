"""LAMB whose trust ratios stay per tensor when ZeRO 1/2 flattens and partitions the parameters.

LAMB scales each tensor's Adam update by ``||w|| / ||update||``. Under ZeRO stages 1 and 2 DeepSpeed hands
the optimizer one flat fp32 partition per parameter group, so an ordinary LAMB (fused or not) computes one
trust ratio per partition (deepspeedai/DeepSpeed#88, #490): another optimizer, which changes with the number
of ranks. Here, after ``deepspeed.initialize``, :func:`attach_zero_layout` tells the optimizer where each
original tensor's fragment lies in its partition; a step then sums squares per tensor over the fragments
(one multi-tensor norm over the fragments), completes the norms with one all-reduce over the group's
data-parallel group (the expert-data-parallel group for expert tensors, as DeepSpeed assigns), and applies each
tensor's ratio to its fragment. Everything is batched over the partition: no per-tensor Python loop in the hot path.

The math is timm's ``Lamb`` (bias correction, gradient averaging, eps 1e-6, trust ratio only where weight
decay is non-zero; clipping by the engine's global norm, done here under ZeRO, see :class:`Lamb`), as it runs
under PyTorch's DDP: a tensor that took no part in this step's loss (another dataset's head and routers, an
expert no token reached) has no gradient there and is skipped, moments and weights untouched, while the group's
step count advances (unless the whole step is masked). DeepSpeed
instead materialises zero gradients for such tensors, and an optimizer that moves them extrapolates their stale
momentum; LAMB's trust ratio then turns that small update into a full step of ``lr * ||w||``, every step the
tensor is idle: a head whose dataset is sampled one step in several drifts between its steps, and its loss
spikes when its dataset comes back. Skipping idle tensors keeps DDP's behaviour. A tensor counts as idle when its
whole gradient (summed over the partitions that hold its fragments) is exactly zero.

A parameter with a ``segments`` attribute of n (a MoE layer's experts stacked, ``mthl_ds.moe.experts``) counts
as n tensors, the slices along its first dimension: each expert has its own trust ratio and idle check, as if it
were a tensor of its own.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor

from mthl_ds.runtime.collectives import all_reduce_


@dataclass
class PartitionLayout:
    """Where the tensors of one parameter group lie in this rank's flat partition.

    ``sizes[s]`` elements of segment s belong to tensor ``tensor_ids[s]`` (``num_tensors`` marks padding).
    """
    sizes: list[int]
    tensor_ids: Tensor
    num_tensors: int
    process_group: object = None
    _on: dict = field(default_factory=dict, repr=False)

    def on(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """(each element's tensor id (int32), segment tensor ids, padding one-hot over tensor ids) on ``device``,
        made once: a per-tensor factor then reaches the elements by one gather (4 bytes per element kept)."""
        if device not in self._on:
            padding = torch.zeros(self.num_tensors + 1, dtype=torch.bool)
            padding[self.num_tensors] = True
            element_ids = torch.repeat_interleave(self.tensor_ids, torch.tensor(self.sizes),
                                                  output_size=sum(self.sizes)).to(torch.int32)
            self._on[device] = (element_ids.to(device), self.tensor_ids.to(device), padding.to(device))
        return self._on[device]


class Lamb(torch.optim.Optimizer):
    """LAMB with per-tensor trust ratios, on whole tensors (ZeRO 0) or ZeRO 1/2 partitions.

    A step makes no host sync and no Python loop over tensors: whole tensors go through multi-tensor
    (``torch._foreach_*``) kernels, a partition through a handful of kernels over the flat tensor, and which
    tensors are idle, their trust ratios and the step count stay on the device. Two device-side inputs, set
    before ``step``:

    - :attr:`apply_mask`: a 0-dim bool tensor (all ranks agree on it); False makes the step leave weights, moments
      and the step count as they are (a non-finite loss on some rank), even if the gradients are not finite.
    - :attr:`grad_norm` with :attr:`max_grad_norm`: under ZeRO, the engine's global gradient norm (a callable
      returning a 0-dim tensor); gradients are scaled by ``min(1, max_grad_norm / (norm + 1e-6))`` first, as
      DeepSpeed clips, but without the host sync of DeepSpeed's own clipping.

    Non-finite gradients (a global norm that is not finite, or, without one, a non-finite norm of some tensor of
    the group) mask the step the same way.

    Args:
        params: parameters or parameter groups.
        lr: learning rate.
        betas: Adam's moment coefficients.
        eps: added to the second-moment root.
        weight_decay: L2 added to the update (LAMB's); groups with 0 get no trust-ratio adaptation.
        skip_idle: leave tensors with an all-zero gradient alone (module docstring); False moves them as
            DeepSpeed's LAMB does (kept to show what that does: tests/test_heads.py).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, skip_idle: bool = True):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.skip_idle = skip_idle
        # Keyed by the flat partition tensor: DeepSpeed steps one group at a time through a swapped-in list.
        self.layouts: dict[Tensor, PartitionLayout] = {}
        self.partitioned = False  # set before ZeRO wraps it: every group must then get a layout
        self.apply_mask: Optional[Tensor] = None
        self.grad_norm: Optional[Callable[[], Tensor]] = None
        self.max_grad_norm = 0.0
        self._whole_layouts: dict[tuple[int, ...], PartitionLayout] = {}  # per list of whole tensors' sizes
        self.cpu_chunk_numel = 1 << 18  # whole tensors on the CPU: chunks of about this size (_update_whole); 0: one

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            whole = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                layout = self.layouts.get(p)
                if self.partitioned and layout is None:
                    raise RuntimeError(f"LAMB param group {group.get('name')!r} holds a ZeRO partition without a "
                                       "layout: call attach_zero_layout(engine) after deepspeed.initialize")
                if layout is None:
                    whole.append(p)
                else:
                    self._update(p, group, layout)
            if whole:
                params, grads, exp_avg, exp_avg_sq = self._segments(whole)
                norms = torch.stack(torch._foreach_norm(grads)).float()
                mask = self._mask(torch.isfinite(norms).all())
                step = self._count_step(group, mask)
                start = 0
                chunked = whole[0].device.type == "cpu" and self.cpu_chunk_numel
                for chunk in cache_sized(params, self.cpu_chunk_numel) if chunked else [params]:
                    part = slice(start, start + len(chunk))
                    self._update_whole(chunk, grads[part], norms[part], group, step, mask, exp_avg[part],
                                       exp_avg_sq[part])
                    start += len(chunk)
        return loss

    def _segments(self, params: list[Tensor]) -> tuple[list[Tensor], ...]:
        """(tensors, gradients, first moments, second moments) of ``params`` with each stacked parameter (a
        ``segments`` attribute) cut into its slices: views, updated in place."""
        lists: tuple[list[Tensor], ...] = ([], [], [], [])
        for p in params:
            grad = p.grad.float() if p.grad.dtype != p.dtype else p.grad
            tensors = (p, grad, *self._moments(p))
            cut = getattr(p, "segments", 1) > 1
            for out, t in zip(lists, tensors):
                out.extend(t.unbind(0) if cut else [t])
        return lists

    @staticmethod
    def _count_step(group: dict, mask: Tensor) -> Tensor:
        """Advance the group's step count (a float64 tensor on the mask's device) where ``mask``; returns it.
        A count saved as a Python number (older checkpoints) or on another device is taken over once."""
        count = group.get("step", 0)
        if not isinstance(count, Tensor) or count.device != mask.device:
            count = torch.as_tensor(count, dtype=torch.float64).to(mask.device)
        group["step"] = count + mask.to(count.dtype)
        return group["step"]

    def _mask(self, finite: Tensor) -> Tensor:
        """Whether this step applies: :attr:`apply_mask` and ``finite`` (0-dim bool tensors on the device)."""
        return finite if self.apply_mask is None else finite & self.apply_mask

    def _clipped(self, grad: Tensor, mask: Tensor) -> Tensor:
        """``grad`` scaled by the clip factor of the engine's global norm, zeroed where ``mask`` is False."""
        if self.grad_norm is not None and self.max_grad_norm > 0:
            coef = (self.max_grad_norm / (self.grad_norm().float() + 1e-6)).clamp(max=1.0).to(grad.dtype)
            grad = grad * coef
        return torch.where(mask, grad, torch.zeros((), dtype=grad.dtype, device=grad.device))

    def _update_whole(self, params: list[Tensor], grads: list[Tensor], norms: Tensor, group: dict, step: Tensor,
                      mask: Tensor, exp_avg: list[Tensor], exp_avg_sq: list[Tensor]) -> None:
        """The same update as ``_update`` on whole tensors, as multi-tensor ops. On the CPU the caller passes
        cache-sized chunks: a model with many small tensors (E experts per layer) pays per-op overhead once per
        chunk, and every op of the chunk finds its tensors in cache. A tensor is idle when its gradient is
        zero: its moments stay (a lerp by 0) and its update is scaled by 0."""
        # a masked step's gradients may be non-finite: zero them (one flat pass)
        flat = self._clipped(torch.cat([g.reshape(-1) for g in grads]), mask)
        grads = [g.view_as(p) for g, p in zip(flat.split([p.numel() for p in params]), params)]
        beta1, beta2 = group["betas"]
        active = (norms > 0) & mask if self.skip_idle else mask.expand_as(norms)
        moving = active.to(params[0].dtype)
        shaped = self._per_element(params)
        torch._foreach_lerp_(exp_avg, grads, shaped(moving * (1 - beta1)))
        torch._foreach_lerp_(exp_avg_sq, torch._foreach_mul(grads, grads), shaped(moving * (1 - beta2)))
        update = torch._foreach_div(exp_avg_sq, (1 - beta2 ** step).to(params[0].dtype))
        torch._foreach_sqrt_(update)
        torch._foreach_add_(update, group["eps"])
        torch._foreach_reciprocal_(update)  # then times exp_avg: no second buffer the size of the model
        torch._foreach_mul_(update, exp_avg)
        torch._foreach_div_(update, (1 - beta1 ** step).to(params[0].dtype))
        scale = moving
        decay = group["weight_decay"]
        if decay:
            torch._foreach_add_(update, params, alpha=decay)
            scale = scale * trust_ratio(torch.stack(torch._foreach_norm(params)).float(),
                                        torch.stack(torch._foreach_norm(update)).float()).to(scale.dtype)
        torch._foreach_mul_(update, shaped(scale))
        torch._foreach_add_(params, update, alpha=-group["lr"])

    def _per_element(self, params: list[Tensor]) -> Callable[[Tensor], list[Tensor]]:
        """``per_tensor (N,) -> [per_tensor[i] spread over a tensor shaped like params[i]]``, as views of one gather
        over the element-to-tensor index of a :class:`PartitionLayout` whose segments are these tensors (kept per
        list of sizes): per-tensor factors then go through the fast multi-tensor kernels (same shapes) rather than
        one kernel per tensor."""
        sizes = [p.numel() for p in params]
        layout = self._whole_layouts.get(tuple(sizes))
        if layout is None:
            layout = self._whole_layouts[tuple(sizes)] = PartitionLayout(sizes, torch.arange(len(sizes)), len(sizes))
        element_ids, _, _ = layout.on(params[0].device)

        def shaped(per_tensor: Tensor) -> list[Tensor]:
            flat = per_tensor.to(params[0].dtype).index_select(0, element_ids)
            return [piece.view_as(p) for piece, p in zip(flat.split(sizes), params)]
        return shaped

    def _moments(self, p: Tensor) -> tuple[Tensor, Tensor]:
        """``p``'s Adam moments (exp_avg, exp_avg_sq), zeros on its first step."""
        state = self.state[p]
        if not state:
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        return state["exp_avg"], state["exp_avg_sq"]

    def _update(self, p: Tensor, group: dict, layout: PartitionLayout) -> None:
        """One ZeRO partition (a flat fragment of many tensors) with its layout. A tensor is idle when its
        gradient, over all its fragments, is zero: its fragments' moments stay and its update is scaled by 0.
        Per-tensor factors reach the elements through the layout's element-to-tensor index."""
        beta1, beta2 = group["betas"]
        element_ids, _, padding = layout.on(p.device)
        per_element = lambda per_tensor: per_tensor.to(p.dtype).index_select(0, element_ids)  # noqa: E731
        grad = p.grad.float() if p.grad.dtype != p.dtype else p.grad
        exp_avg, exp_avg_sq = self._moments(p)
        sums = self._tensor_sums([grad], layout)[0]  # (tensors + padding,), the same on every rank
        finite = torch.isfinite(self.grad_norm()).all() if self.grad_norm is not None else torch.isfinite(sums).all()
        mask = self._mask(finite)
        step = self._count_step(group, mask)
        grad = self._clipped(grad, mask)
        active = ((sums > 0) | padding) & mask if self.skip_idle else mask.expand_as(sums)
        moving = active.to(torch.float32)
        exp_avg.lerp_(grad, per_element(moving * (1 - beta1)))
        exp_avg_sq.lerp_(grad * grad, per_element(moving * (1 - beta2)))
        update = exp_avg_sq.div(1 - beta2 ** step).sqrt_().add_(group["eps"])
        torch.div(exp_avg, update, out=update).div_(1 - beta1 ** step)
        decay = group["weight_decay"]
        scale = moving
        if decay:  # layer-wise adaptation where there is weight decay, as in timm
            update.add_(p, alpha=decay)
            w_square, u_square = self._tensor_sums([p, update], layout)
            scale = scale * trust_ratio(w_square.sqrt(), u_square.sqrt())
        update.mul_(per_element(scale))
        p.add_(update, alpha=-group["lr"])

    @staticmethod
    def _tensor_sums(rows: list[Tensor], layout: PartitionLayout) -> Tensor:
        """Sum of squares of each row per original tensor: (rows, tensors), all-reduced across partitions:
        one multi-tensor norm over the tensors' fragments (views), one all-reduce."""
        _, tensor_ids, _ = layout.on(rows[0].device)
        norms = torch.stack([torch.stack(torch._foreach_norm(list(r.split(layout.sizes)))) for r in rows]).float()
        sums = norms.new_zeros(len(rows), layout.num_tensors + 1)
        sums.index_add_(1, tensor_ids, norms.pow(2))
        return all_reduce_(sums, group=layout.process_group)


def trust_ratio(w_norm: Tensor, u_norm: Tensor) -> Tensor:
    """LAMB's per-tensor ``||w|| / ||update||``, 1 where either norm is 0 (as in timm)."""
    return torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))


def cache_sized(params: list[Tensor], numel: int = 1 << 18) -> list[list[Tensor]]:
    """Consecutive chunks of ``params`` of about ``numel`` elements (1 MiB of float32); a larger tensor alone."""
    chunks, current, size = [], [], 0
    for p in params:
        if current and size + p.numel() > numel:
            chunks.append(current)
            current, size = [], 0
        current.append(p)
        size += p.numel()
    return chunks + [current] if current else chunks


def attach_zero_layout(engine, max_grad_norm: float = 0.0) -> None:
    """Give the engine's :class:`Lamb` the tensor layout of every ZeRO 1/2 partition (after initialize), and with
    ``max_grad_norm`` the engine's global gradient norm to clip by (the engine's own clipping must then be off).

    A :class:`Lamb` built for ZeRO (``partitioned``) refuses to step on a partition that has no layout, so a
    ZeRO + LAMB run never falls back to per-partition trust ratios silently.
    """
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    zero = engine.optimizer
    if not isinstance(zero, DeepSpeedZeroOptimizer):
        return
    inner = zero.optimizer
    if not isinstance(inner, Lamb):
        return  # another optimizer (AdamW) needs no layout; our Lamb refuses to step without one
    if max_grad_norm > 0:
        if not zero.compute_grad_norm:
            raise RuntimeError("LAMB clips by the ZeRO optimizer's global gradient norm: "
                               "zero_optimization.compute_grad_norm must stay true")
        inner.grad_norm = lambda: zero._global_grad_norm
        inner.max_grad_norm = max_grad_norm
    for index, _ in enumerate(inner.param_groups):
        group_pg = zero.real_dp_process_group[index]
        rank = torch.distributed.get_rank(group=group_pg)
        size = zero.partition_size[index]
        start, end = rank * size, (rank + 1) * size
        tensors, offsets = zero.round_robin_bit16_groups[index], zero.round_robin_bit16_offsets[index]
        pieces = [(offset + k * (t.numel() // n), t.numel() // n) for t, offset in zip(tensors, offsets)
                  for n in [getattr(t, "segments", 1)] for k in range(n)]  # a stacked tensor: its n slices
        padding = len(pieces)
        lengths, ids, cursor = [], [], start
        for tensor_id, (offset, numel) in enumerate(pieces):
            a, b = max(offset, start), min(offset + numel, end)
            if a >= b:
                continue
            if a > cursor:
                lengths.append(a - cursor)
                ids.append(padding)
            lengths.append(b - a)
            ids.append(tensor_id)
            cursor = b
        if cursor < end:
            lengths.append(end - cursor)
            ids.append(padding)
        flat = zero.single_partition_of_fp32_groups[index]
        if sum(lengths) != flat.numel():
            raise RuntimeError(f"ZeRO partition {index} has {flat.numel()} elements, layout covers {sum(lengths)}")
        layout = PartitionLayout(lengths, torch.tensor(ids, dtype=torch.long), padding, group_pg)
        layout.on(flat.device)  # its device index now, with the other optimizer states, not at the first step
        inner.layouts[flat] = layout

"""Every ``torch.distributed`` collective of the package, in one module (``tests/test_device.py`` refuses one
anywhere else).

A process group's backend decides where its tensors must live: NCCL takes tensors on the rank's CUDA device,
gloo CPU tensors. A tensor on the wrong device is refused, naming both, instead of being copied: the copy would
be a device-to-host sync hidden in every step, and NCCL itself fails later with a less helpful message. In one
process (no process group, or a group of one) every function is the identity and touches no device.
"""
from __future__ import annotations

import torch
from torch import Tensor

OPS = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX,
       "min": torch.distributed.ReduceOp.MIN}


def distributed(group=None) -> bool:
    """Whether a collective over ``group`` (default: the world) involves other ranks."""
    return torch.distributed.is_initialized() and torch.distributed.get_world_size(group) > 1


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def check_device(tensor: Tensor, group=None) -> None:
    """Refuse a tensor the group's backend cannot take (NCCL: CUDA tensors; gloo: CPU tensors)."""
    backend = str(torch.distributed.get_backend(group))
    wanted = "cuda" if backend == "nccl" else "cpu" if backend == "gloo" else None
    if wanted is not None and tensor.device.type != wanted:
        raise ValueError(f"a {backend} collective was handed a tensor on {tensor.device}; {backend} takes {wanted} "
                         "tensors: create it on the run's device (mthl_ds.runtime.device.local_device())")


def all_reduce_(tensor: Tensor, op: str = "sum", group=None) -> Tensor:
    """Reduce ``tensor`` over ``group`` in place (``op``: sum, max or min) and return it."""
    if distributed(group):
        check_device(tensor, group)
        torch.distributed.all_reduce(tensor, op=OPS[op], group=group)
    return tensor


def all_reduce_sum(tensor: Tensor, group=None) -> Tensor:
    """Sum over the ranks into a copy (the tensor itself in one process)."""
    return all_reduce_(tensor.clone(), "sum", group) if distributed(group) else tensor


def all_reduce_mean(tensor: Tensor, group=None) -> Tensor:
    """Mean over the ranks into a copy (the tensor itself in one process); used for the MI buffers."""
    if not distributed(group):
        return tensor
    return all_reduce_sum(tensor, group) / torch.distributed.get_world_size(group)


class SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) whose gradient is the all-reduced gradient: every rank's statistics feed every rank's
    loss (synchronised BatchNorm)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return all_reduce_(x.clone())

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return all_reduce_(grad.clone())


def sum_over_ranks(tensor: Tensor) -> Tensor:
    """Differentiable sum over every rank (the tensor itself in one process)."""
    return SumOverRanks.apply(tensor) if distributed() else tensor


def all_gather_objects(obj, group=None) -> list:
    """Every rank's ``obj`` (pickled; for results, not for the step's path)."""
    if not distributed(group):
        return [obj]
    out = [None] * torch.distributed.get_world_size(group)
    torch.distributed.all_gather_object(out, obj, group=group)
    return out


def all_gather(tensor: Tensor, group=None) -> list[Tensor]:
    """Every rank's ``tensor`` (same shape on every rank)."""
    if not distributed(group):
        return [tensor]
    check_device(tensor, group)
    out = [torch.empty_like(tensor) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(out, tensor, group=group)
    return out


def barrier(group=None) -> None:
    if distributed(group):
        torch.distributed.barrier(group=group)


class AllToAllRows(torch.autograd.Function):
    """Rows of a tensor exchanged over ``group``: ``send[r]`` rows to rank r, ``receive[r]`` rows from it; the
    gradient goes back by the same exchange reversed."""

    @staticmethod
    def forward(ctx, x: Tensor, send: list[int], receive: list[int], group) -> Tensor:
        ctx.send, ctx.receive, ctx.group = send, receive, group
        check_device(x, group)
        out = x.new_empty((sum(receive), *x.shape[1:]))
        torch.distributed.all_to_all_single(out, x.contiguous(), receive, send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        return AllToAllRows.apply(grad, ctx.receive, ctx.send, ctx.group), None, None, None


def all_to_all_rows(x: Tensor, send: list[int], receive: list[int], group=None) -> Tensor:
    """Differentiable exchange of rows of varying counts (dropless expert parallelism); ``x`` itself in one
    process."""
    return AllToAllRows.apply(x, send, receive, group) if distributed(group) else x


def all_to_all_equal(x: Tensor, group=None) -> Tensor:
    """``x`` [ranks, ...]: row r goes to rank r; returns [ranks, ...], row r from rank r (split sizes, counts)."""
    if not distributed(group):
        return x
    check_device(x, group)
    out = torch.empty_like(x)
    torch.distributed.all_to_all_single(out, x.contiguous(), group=group)
    return out

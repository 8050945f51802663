"""Counting a model: parameters, and FLOPs with torch's counter (``FlopCounterMode``: 2 FLOPs per multiply-add,
matmuls, convolutions and attention only; elementwise ops count nothing)."""
from __future__ import annotations

from typing import Callable, Iterable, Sequence, Union

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_parameters(params: Union[nn.Module, Iterable[torch.Tensor]], trainable_only: bool = False) -> int:
    """Elements of a module's parameters (or of the given tensors); ``trainable_only``: of those that require
    grad only."""
    if isinstance(params, nn.Module):
        params = params.parameters()
    return sum(p.numel() for p in params if p.requires_grad or not trainable_only)


def grouped_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """``torch._grouped_mm``: 2 FLOPs per multiply-add of every group. Two 2-D operands (the weight gradient:
    [K, M] x [M, N] -> [G, K, N]) split the contracted M into groups; otherwise each output element contracts
    ``a_shape[-1]`` values."""
    if len(a_shape) == 2 and len(b_shape) == 2:
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]
    return 2 * a_shape[-1] * int(torch.Size(out_shape).numel())


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of whatever ``fn()`` runs (a forward, a forward and backward, ...), by torch's counter, which also
    counts ``torch._grouped_mm`` (the dropless experts) here."""
    mapping = {torch.ops.aten._grouped_mm: grouped_mm_flops} if hasattr(torch.ops.aten, "_grouped_mm") else {}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return counter.get_total_flops()


@torch.no_grad()
def image_flops(model: nn.Module, dataset: str, size: Sequence[int], backbone_only: bool = True) -> int:
    """FLOPs of one zero image of ``size`` (height, width) of ``dataset`` through the model in eval mode (left in
    eval mode): through the backbone only, or the backbone and the dataset's head."""
    model.eval()
    model.set_dataset(dataset)
    x = torch.zeros(1, 3, *size)
    return count_flops(lambda: (model.backbone if backbone_only else model)(x))

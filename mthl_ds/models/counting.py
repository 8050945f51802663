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


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of whatever ``fn()`` runs (a forward, a forward and backward, ...), by torch's counter."""
    with FlopCounterMode(display=False) as counter:
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

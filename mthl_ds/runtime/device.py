"""Where a process computes: one device, from one place.

A training rank computes on its local rank's CUDA device (``LOCAL_RANK``, which deepspeed, torchrun and our srun
script set), or on the CPU where there is no CUDA. Evaluate, predict and stats take ``--device`` (``cpu``,
``cuda``, ``cuda:N``). Batches are moved there in one call (every tensor, also inside lists: detection boxes), with
``non_blocking`` copies that overlap the GPU's work when the loader pins its memory (:func:`pin_memory`).
"""
from __future__ import annotations

import os
from typing import Optional, Union

import torch

DeviceLike = Union[str, torch.device, None]


def local_device() -> torch.device:
    """The local rank's CUDA device, or the CPU where CUDA is not available."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def resolve(device: DeviceLike = None) -> torch.device:
    """A device a user named (``cpu``, ``cuda``, ``cuda:N``; None: :func:`local_device`), checked against this
    machine before any work: an unknown name, CUDA where there is none or a GPU index past the last is refused."""
    from mthl_ds.errors import InputError
    if device is None:
        return local_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InputError(f"--device {device!r}: not a device name (cpu, cuda, cuda:N): {e}") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise InputError(f"--device {device!r}: this stack runs on cpu or cuda[:N]")
    if not torch.cuda.is_available():
        raise InputError(f"--device {device!r}: CUDA is not available on this machine")
    index = torch.cuda.current_device() if dev.index is None else dev.index
    if index >= torch.cuda.device_count():
        raise InputError(f"--device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", index)


def pin_memory() -> bool:
    """Whether loaders should pin their batches: only where they go to a GPU."""
    return torch.cuda.is_available()


def to_device(batch: dict, device: torch.device, image_dtype: Optional[torch.dtype] = None) -> dict:
    """``batch`` with every tensor (also in lists, e.g. detection boxes) on ``device``, copied ``non_blocking``;
    the image is then cast to ``image_dtype`` on the device. Values that are not tensors stay as they are."""
    def move(value):
        if isinstance(value, torch.Tensor):
            return value.to(device, non_blocking=True)
        if isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
            return [v.to(device, non_blocking=True) for v in value]
        return value
    moved = {key: move(value) for key, value in batch.items()}
    if image_dtype is not None:
        moved["image"] = moved["image"].to(image_dtype)
    return moved

"""fp16 training on a CPU, as the V100 run does it on GPUs: for rehearsals and tests only.

DeepSpeed's CPU accelerator refuses fp16 (``Type fp16 is not supported on your device``) unless oneDNN has fp16
kernels, and where it has none (this project's CPUs: 0.9 GFLOP/s for an fp16 matmul, 49 in fp32) an fp16 step at
the paper's shapes would take hours. :func:`enable` declares fp16 support on the CPU accelerator and runs every
fp16 matrix multiply and convolution (forward and backward) in float32 on the fp16 values, rounding the result to
fp16: what a V100's tensor cores and cuDNN do (fp16 inputs, fp32 accumulation, fp16 output). Everything else
(weights, activations, gradients, DeepSpeed's fp16 optimizer, loss scaling, overflow checks, communication) stays
in fp16 as on the GPU. The product on a GPU needs nothing of this; it is enabled only by the processes that ask:

    mthl-ds train --cpu-fp16 --recipe NAME --out RUN_DIR ...     # each rank calls enable()
"""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

aten = torch.ops.aten
FLOAT32_OPS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default,
               aten.convolution.default, aten.convolution_backward.default}
_mode = None


def _to(dtype, source):
    return lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype == source else t


class HalfMatmulsInFloat32(TorchDispatchMode):
    """fp16 matmuls and convolutions computed in float32 and rounded to fp16."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FLOAT32_OPS and any(isinstance(t, torch.Tensor) and t.dtype == torch.float16 for t in args):
            args, kwargs = tree_map(_to(torch.float32, torch.float16), (args, kwargs))
            return tree_map(_to(torch.float16, torch.float32), func(*args, **kwargs))
        return func(*args, **kwargs)


def enable() -> bool:
    """Declare fp16 on DeepSpeed's CPU accelerator and compute fp16 matmuls in float32, for this process. Where
    CUDA is available it does nothing and returns False: GPUs run fp16 natively, and the shim must never touch
    a CUDA run."""
    global _mode
    if torch.cuda.is_available():
        return False
    if _mode is not None:
        return True
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator
    CPU_Accelerator.is_fp16_supported = lambda self: True
    CPU_Accelerator.supported_dtypes = lambda self: [torch.float32, torch.bfloat16, torch.float16]
    _mode = HalfMatmulsInFloat32()
    _mode.__enter__()
    return True

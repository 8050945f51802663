"""Host memory for CPU compute: large freed blocks kept for reuse, as a GPU's caching allocator keeps them.

torch's CPU tensors come from ``malloc``. glibc serves a block over its mmap threshold (at most 32 MiB) with a fresh
``mmap`` and returns it with ``munmap`` when freed, so every large activation or gradient of every step is faulted
in again page by page, and the kernel zeroes each page. At Swin-T's sizes that is most of a CPU process's system
time (``mthl-ds bench step --precisions fp32``: 113 s of system time in 814 s of CPU time, 40 M minor page
faults), and it weighs most on the largest tensors: the dense MLP's hidden activations more than an MoE layer's
per-expert slices. So a benchmark that compares the two keeps freed blocks (``mthl-ds bench``).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
KEEP_BYTES = 1 << 30


def keep_freed_blocks() -> bool:
    """Make this process's ``malloc`` serve blocks up to 1 GiB from its heap and keep what is freed there for the
    next allocation, instead of mapping and unmapping them: glibc's ``mallopt`` (``M_MMAP_THRESHOLD`` and
    ``M_TRIM_THRESHOLD`` at 1 GiB), as the variables ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` set them
    at a process's start. The process's resident memory then stays near its peak instead of falling between steps.

    Returns whether both settings took: False on a C library other than glibc (nothing is changed there)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # no C library by that name, or one without mallopt (musl)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, KEEP_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, KEEP_BYTES))

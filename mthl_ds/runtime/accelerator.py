"""Name DeepSpeed's accelerator before DeepSpeed guesses: its guess prints a warning to stdout on CPU machines,
which would corrupt ``mthl-ds ... --json``. Every module that imports DeepSpeed imports this first.

It also gives the ops DeepSpeed builds on first use (its CPU shared-memory all-reduce, FusedLamb) a build folder
per torch version, unless ``TORCH_EXTENSIONS_DIR`` is set. torch's default folder is the same for every torch
version of one Python and CUDA, and torch 2.14 leaves the folder's ``lock`` file in place (an advisory lock now)
while torch 2.11 waits for that file to disappear: on a machine where both ran, every torch 2.11 process would
hang in its first collective's set-up."""
import os
import sys

import torch

if "DS_ACCELERATOR" not in os.environ:
    os.environ["DS_ACCELERATOR"] = "cuda" if torch.cuda.is_available() else "cpu"

if "TORCH_EXTENSIONS_DIR" not in os.environ:
    from torch.utils.cpp_extension import get_default_build_root

    os.environ["TORCH_EXTENSIONS_DIR"] = os.path.join(
        get_default_build_root(), f"torch{torch.__version__}_py{sys.version_info.major}{sys.version_info.minor}")

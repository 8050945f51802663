"""Name DeepSpeed's accelerator before DeepSpeed guesses: its guess prints a warning to stdout on CPU machines,
which would corrupt ``mthl-ds ... --json``. Every module that imports DeepSpeed imports this first."""
import os

if "DS_ACCELERATOR" not in os.environ:
    import torch

    os.environ["DS_ACCELERATOR"] = "cuda" if torch.cuda.is_available() else "cpu"

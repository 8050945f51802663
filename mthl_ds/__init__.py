"""mthl-ds: multi-task heterogeneous vision learners on DeepSpeed-MoE."""
import os

if "DS_ACCELERATOR" not in os.environ:
    # Name the accelerator before DeepSpeed guesses: its guess prints a warning to stdout on CPU machines,
    # which would corrupt `mthl-ds ... --json`.
    import torch

    os.environ["DS_ACCELERATOR"] = "cuda" if torch.cuda.is_available() else "cpu"

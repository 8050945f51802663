"""Join the process group the deepspeed launcher describes, all-reduce one tensor, print the sum."""
import torch

from mthl_ds.runtime.collectives import all_reduce_sum, world
from mthl_ds.runtime.engine import init_distributed

init_distributed()
rank, size = world()
print(f"rank {rank}/{size} sum {float(all_reduce_sum(torch.ones(1)).item()):.0f}", flush=True)

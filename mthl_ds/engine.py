"""DeepSpeed at the edge: process group, DeepSpeed config, optimizer groups, LR schedule, engine."""
from __future__ import annotations

import os

import deepspeed
import torch
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
from torch import nn

from mthl_ds.config import Recipe, read_ds_config


def init_distributed() -> None:
    """Join the process group the launcher describes (deepspeed, torchrun, srun); a plain process is rank 0 of 1."""
    if torch.distributed.is_initialized():
        return
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, verbose=False)


def world() -> tuple[int, int]:
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def ep_rank(ep_size: int) -> int:
    """This rank's index in its expert-parallel group: DeepSpeed groups consecutive ranks."""
    return world()[0] % ep_size


def is_no_decay(name: str, param: nn.Parameter) -> bool:
    """Norms, biases and routers get no weight decay."""
    return param.ndim <= 1 or ".routers." in name


def optimizer_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters in decay / no-decay groups, split by DeepSpeed into MoE / non-MoE groups."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if is_no_decay(name, param) else decay).append(param)
    groups = [{"name": "decay", "params": decay, "weight_decay": weight_decay},
              {"name": "no_decay", "params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    return split_params_into_different_moe_groups_for_optimizer(groups)


def build_optimizer(groups: list[dict], lr: float, kind: str = "lamb") -> torch.optim.Optimizer:
    """LAMB (the paper's), or AdamW. The engine clips gradients, so timm's LAMB must not clip with its own
    local norm (``max_grad_norm=None``)."""
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    from timm.optim import Lamb
    return Lamb(groups, lr=lr, max_grad_norm=None)


def triangular_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
    """Linear warm-up from 0 to the peak LR, then linear decay to 0 at ``total_steps``."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def ds_config(recipe: Recipe, world_size: int) -> dict:
    """The recipe's DeepSpeed JSON with the runtime values merged in."""
    cfg = read_ds_config(recipe.train.ds_config)
    micro = max(d.batch_size for d in recipe.datasets.values())  # bookkeeping only: batches vary per dataset
    cfg.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=1,
               train_batch_size=micro * world_size, gradient_clipping=recipe.train.grad_clip)
    return cfg


def build_engine(model: nn.Module, recipe: Recipe):
    """``deepspeed.initialize`` with LAMB, the triangular schedule and the merged config."""
    _, world_size = world()
    optimizer = build_optimizer(optimizer_groups(model, recipe.train.weight_decay), recipe.train.lr,
                                recipe.train.optimizer)
    scheduler = triangular_schedule(optimizer, recipe.train.warmup_steps, recipe.train.steps)
    engine, optimizer, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                           config=ds_config(recipe, world_size))
    return engine, optimizer, scheduler


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Average over all ranks (identity in a single process); used for the MI buffers."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return tensor
    tensor = tensor.clone()
    torch.distributed.all_reduce(tensor)
    return tensor / torch.distributed.get_world_size()


@torch.no_grad()
def sync_norm_statistics(module: nn.Module) -> None:
    """Average BatchNorm running statistics over ranks (one collective). DeepSpeed, unlike DDP, leaves them
    per rank; kept equal, they make evaluation rank-independent and checkpoints (saved by rank 0) exact."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return
    stats = [t for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
             for t in (m.running_mean, m.running_var)]
    if not stats:
        return
    flat = torch.cat([t.flatten() for t in stats])
    torch.distributed.all_reduce(flat)
    flat /= torch.distributed.get_world_size()
    offset = 0
    for t in stats:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()

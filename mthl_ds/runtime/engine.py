"""DeepSpeed at the edge: process group, DeepSpeed config, optimizer groups, LR schedule, engine."""
from __future__ import annotations

from mthl_ds.runtime import accelerator  # noqa: F401  (before DeepSpeed: names its accelerator)

import atexit
import dataclasses
import os
import socket
from datetime import timedelta
from pathlib import Path

import deepspeed
import torch
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
from torch import nn

from mthl_ds.runtime.collectives import all_reduce_, barrier, world
from mthl_ds.config import Recipe, read_ds_config
from mthl_ds.runtime.device import local_device
from mthl_ds.runtime.optim import Lamb, attach_zero_layout


def init_distributed(timeout_s: float = 600.0) -> None:
    """Join the process group the launcher describes (deepspeed, torchrun, srun). A process started without a
    launcher is rank 0 of 1 on a free loopback port; it ignores the MASTER_* variables, so it cannot collide
    with a port some other process left in the environment (it sets only LOCAL_RANK, which the engine needs).

    ``timeout_s`` bounds the rendezvous and every collective of every group (``train.collective_timeout_s``): a rank
    whose peers are gone or hung raises after it instead of waiting forever. DeepSpeed creates its ZeRO and expert
    groups with ``new_group()`` and no timeout, for which torch takes its module default (30 min for gloo): that
    default is set too, before any group exists.

    With CUDA the backend is NCCL and the rank's device (``mthl_ds.runtime.device.local_device``) is made current first,
    so that NCCL and every ``cuda`` tensor without an index use it; else gloo on the CPU."""
    if torch.distributed.is_initialized():
        return
    device = local_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = timedelta(seconds=timeout_s)
    c10d = torch.distributed.distributed_c10d
    c10d.default_pg_timeout = c10d.default_pg_nccl_timeout = timeout
    if "WORLD_SIZE" in os.environ:
        deepspeed.init_distributed(dist_backend=backend, verbose=False, timeout=timeout)
    else:
        os.environ.setdefault("LOCAL_RANK", "0")
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                                   init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    atexit.register(leave_process_group)
    if backend == "gloo":
        release_shm_buffer()


def leave_process_group() -> None:
    """Destroy the process group before the interpreter shuts down. Left to interpreter finalization, gloo's
    worker threads can still hold work objects whose teardown needs the GIL, and a rank then aborts after its
    work is done ("terminate called without an active exception", SIGABRT)."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def release_shm_buffer() -> None:
    """Remove the name of this rank's DeepSpeed shared-memory all-reduce buffer.

    On the CPU accelerator, DeepSpeed maps a ~70 MB ``/dev/shm/deepspeed_allreduce_buffer_*`` file per rank
    (named after MASTER_ADDR / MASTER_PORT) when all ranks are on one node, and never removes it: /dev/shm is
    RAM, so finished runs would fill it until later runs' ranks are killed for memory. Once every rank has
    mapped its peers' buffers (they do so inside ``init_distributed``; the barrier waits for all), the names
    can go: the mappings stay valid and the memory is freed when the ranks exit.
    """
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{torch.distributed.get_rank()}")
    barrier()
    (Path("/dev/shm") / name).unlink(missing_ok=True)


LAUNCHER_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE")


def launcher_free_env() -> dict[str, str]:
    """This process's environment without the rendezvous variables a launcher set, for a child process that
    must start (or join) its own process group."""
    return {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}


def free_port() -> int:
    """A loopback port nobody listens on now (for a rendezvous or a launcher's master port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ep_rank(ep_size: int) -> int:
    """This rank's index in its expert-parallel group: DeepSpeed groups consecutive ranks."""
    return world()[0] % ep_size


def is_no_decay(name: str, param: nn.Parameter) -> bool:
    """Norms, biases and routers get no weight decay (of stacked experts, by the shape of one expert's slice)."""
    dims = param.ndim - 1 if hasattr(param, "segments") else param.ndim
    return dims <= 1 or ".routers." in name


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


def build_optimizer(groups: list[dict], lr: float, kind: str = "lamb", zero_stage: int = 0) -> torch.optim.Optimizer:
    """LAMB (the paper's, per-tensor trust ratios at every ZeRO stage: mthl_ds.runtime.optim), or AdamW."""
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    optimizer = Lamb(groups, lr=lr)
    optimizer.partitioned = zero_stage in (1, 2)
    return optimizer


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
    config = ds_config(recipe, world_size)
    stage = config.get("zero_optimization", {}).get("stage", 0)
    lamb_clips = recipe.train.optimizer == "lamb" and stage in (1, 2)
    if lamb_clips:  # LAMB clips by ZeRO's global norm on the device; DeepSpeed's clipping reads it on the host
        config["gradient_clipping"] = 0.0
    optimizer = build_optimizer(optimizer_groups(model, recipe.train.weight_decay), recipe.train.lr,
                                recipe.train.optimizer, stage)
    scheduler = triangular_schedule(optimizer, recipe.train.warmup_steps, recipe.train.steps)
    engine, optimizer, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                           config=config)
    attach_zero_layout(engine, recipe.train.grad_clip if lamb_clips else 0.0)
    use_multi_tensor_zero_norm(engine)
    if stage == 0:
        use_exact_moe_clipping(engine)
    return engine, optimizer, scheduler


def use_multi_tensor_zero_norm(engine) -> None:
    """ZeRO 1/2's global gradient norm and fp16 overflow check as multi-tensor kernels (:func:`global_grad_norm`,
    :func:`has_nonfinite`): a few kernels per parameter group, where DeepSpeed's take a few per tensor of the
    rank's partition. With them an optimizer step of MTHL Swin-T (832 tensors) dispatches 259 ops in bf16 and 290
    in fp16, against 1,955 and 12,789 with DeepSpeed's (``mthl-ds bench launches``, the ``step`` column). The
    values are DeepSpeed's (``get_grad_norm_direct``, ``_average_expert_grad_norms``, ``combine_grad_norm_groups``,
    ``has_overflow_partitioned_grads_serial``) up to rounding; DeepSpeed's averaging of an expert group's norm over
    its expert-data-parallel group, whose ranks already hold the same value after the data-parallel all-reduce, is
    the identity and left out. Installed on the ZeRO optimizer object where it runs without CPU offload, model or
    pipeline parallelism; DeepSpeed's own code stays in place otherwise."""
    from deepspeed.runtime.pipe.engine import PipelineEngine
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    zero = engine.optimizer
    if (not isinstance(zero, DeepSpeedZeroOptimizer) or isinstance(engine, PipelineEngine) or zero.cpu_offload
            or zero.model_parallel_world_size > 1):
        return

    def groups() -> list[list[torch.Tensor]]:  # each group's gradient fragments in this rank's partition
        return [zero.averaged_gradients[i] for i in range(len(zero.bit16_groups))]

    zero.scaled_global_norm = lambda norm_type=2: global_grad_norm(groups(), zero.dp_process_group, norm_type)
    zero.has_overflow_partitioned_grads_serial = lambda: has_nonfinite(groups())


def fragment_norms(groups: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """Per group, the float32 L2 norm of each gradient tensor or ZeRO fragment (ZeRO's padding fragments left
    out): one multi-tensor op per group."""
    device = next((g.device for fragments in groups for g in fragments if g is not None), None)
    norms = []
    for fragments in groups:
        kept = [g for g in fragments if g is not None and not getattr(g, "_zero_padding", False)]
        norms.append(torch.stack(torch._foreach_norm(kept, 2, dtype=torch.float32)) if kept
                     else torch.zeros(0, device=device))
    return norms


def global_grad_norm(groups: list[list[torch.Tensor]], process_group=None, norm_type: int = 2) -> torch.Tensor:
    """The L2 norm of every group's gradient fragments over the data-parallel ``process_group`` (each rank holds
    its own partition), infinite where a fragment is not finite: the norm ZeRO clips by and reads overflow from.
    Squares are summed in float32 (DeepSpeed: float64), so a gradient element beyond 1.8e19 makes it infinite
    and the step is skipped as non-finite rather than clipped."""
    if norm_type != 2:
        raise ValueError(f"only the L2 gradient norm is supported, not norm_type={norm_type}")
    squares = all_reduce_(torch.stack([n.square().sum() for n in fragment_norms(groups)]), group=process_group)
    total = squares.sum().sqrt()
    return torch.where(torch.isfinite(squares).all(), total, torch.full_like(total, float("inf")))


def has_nonfinite(groups: list[list[torch.Tensor]]) -> torch.Tensor:
    """Whether a gradient fragment of this rank holds an inf or NaN: a bool tensor of shape (1,) on the device."""
    return (~torch.isfinite(torch.cat(fragment_norms(groups)))).any().reshape(1)


def use_exact_moe_clipping(engine) -> None:
    """Clip stage-0 gradients by the true global norm of a model with expert parallelism.

    DeepSpeed's stage-0 ``clip_grad_norm_`` averages each rank's local norm (shared tensors plus *its own*
    experts) over ranks, which is not the norm of the whole gradient, so the clip factor, and the training,
    change with ep_size. Here: shared tensors' squares (already averaged, the same on every rank) plus the
    experts' squares summed over each expert-parallel group. ZeRO 1/2 already compute the exact norm. The norms
    and the factor stay on the gradients' device (multi-tensor norms, one multi-tensor scale): no host sync.
    """
    from deepspeed.moe.utils import is_moe_param
    from deepspeed.utils import groups

    def squares(grads: list[torch.Tensor]) -> torch.Tensor:
        return fragment_norms([grads])[0].square().sum()

    def clip() -> None:
        params = [p for p in engine.module.parameters() if p.grad is not None]
        if not params:
            return
        shared = [p.grad for p in params if not is_moe_param(p)]
        experts: dict[str, list[torch.Tensor]] = {}
        for p in params:
            if is_moe_param(p):
                experts.setdefault(p.group_name, []).append(p.grad)
        total = squares(shared) if shared else params[0].grad.new_zeros((), dtype=torch.float32)
        for name, grads in experts.items():
            total = total + all_reduce_(squares(grads), group=groups._get_expert_parallel_group(name))
        coef = (engine.gradient_clipping() / (total.sqrt() + 1e-6)).clamp(max=1.0)
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for p in params:
            by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
        for dtype, grads in by_dtype.items():
            torch._foreach_mul_(grads, coef.to(dtype))

    engine.clip_fp32_gradients = clip


def engine_state_bytes(engine) -> dict[str, int]:
    """What a DeepSpeed engine holds between steps, measured: its module's weights and the tensors of its
    (ZeRO) optimizer and the optimizer inside it (master copies, moments), each storage once."""
    params = list(engine.module.parameters())
    skip = {p.untyped_storage().data_ptr() for p in params}
    seen: set = set()
    weights = tensor_bytes(params, set(), set())
    holders = [engine.optimizer] + ([engine.optimizer.optimizer] if hasattr(engine.optimizer, "optimizer") else [])
    optimizer = sum(tensor_bytes(v, seen, skip) for h in holders for k, v in vars(h).items() if k != "param_groups")
    return {"weights": weights, "optimizer": optimizer}


def tensor_bytes(obj, seen: set, skip: set) -> int:
    """Bytes of the tensors in nested dicts / lists / tuples, each storage once, storages in ``skip`` not at all."""
    if isinstance(obj, torch.Tensor):
        ptr = obj.untyped_storage().data_ptr()
        if ptr in seen or ptr in skip or obj.numel() == 0:
            return 0
        seen.add(ptr)
        return obj.untyped_storage().nbytes()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen, skip) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v, seen, skip) for v in obj)
    if dataclasses.is_dataclass(obj):  # e.g. LAMB's partition layouts and what they keep on the device
        return tensor_bytes(vars(obj), seen, skip)
    return 0

"""Per-GPU memory of a recipe's training run: weights, gradients and optimizer states from the ZeRO layout, and
activation memory per dataset measured on this machine and extrapolated to the recipe's per-GPU batch.

States (bytes per GPU, P = shared parameters, X = all experts' parameters, ep = expert-parallel size, N = GPUs,
b = 2 for fp16 / bf16 weights, 4 for fp32; DeepSpeed 0.19's ZeRO 1/2, checked on 2 CPU ranks by ``mthl-ds
rehearse``, which prints both: weights to the byte, optimizer states within DeepSpeed's padding of each partition):
    weights    b * (P + X / ep)                       every GPU holds the shared weights and its experts
    partition  P / N + (X / ep) / (N / ep)            what ZeRO 1/2 give one GPU: shared tensors split over all
                                                      N ranks, experts over their expert-data-parallel group
    optimizer  (4 + 8 + 4) * partition                fp32 master copy + LAMB's two moments + its element-to-tensor
                                                      index (4 + 8 with AdamW), or
               (4 + 8 + 4) * (P + X / ep) at stage 0 (+ 4 x that for the fp16 master copy)
    gradients  b * partition + reduce buckets (ZeRO 2: reduce_bucket_size, twice with overlap_comm), or
               b * (P + X / ep) at stages 0 / 1

Activations: the bytes of every tensor autograd saves for backward in one training forward (and loss) of the
real model at the dataset's input size and precision, each storage counted once, parameters excluded, measured at
batch 1 and 2 and extrapolated linearly, A(B) = A(1) + (B - 1) (A(2) - A(1)): saved activations grow with the
batch, and the intercept keeps what does not (e.g. tables built per input size). Measured on a CUDA device, the
plan takes instead the allocator's peak over forward and backward (less the parameter gradients), extrapolated the
same way: it also holds the transient tensors (a loss's full-resolution logits and their gradient, workspaces),
which the saved tensors miss (for UperNet at 512 x 512 the peak is well above the saved tensors). Not counted:
the allocator's fragmentation, nor the CUDA context; a recipe "fits" a card when its largest dataset's total
stays under ``FIT_SHARE`` of the card's memory, a margin for those.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from mthl_ds.config import Recipe, read_ds_config
from mthl_ds.models.counting import count_parameters

GIB = 2 ** 30
FIT_SHARE = 0.9  # of a card's memory, the rest kept for the CUDA context, workspaces and fragmentation
DEEPSPEED_REDUCE_BUCKET = 500_000_000  # DeepSpeed's default reduce_bucket_size (elements)


def precision(recipe: Recipe) -> str:
    cfg = read_ds_config(recipe.train.ds_config)
    if cfg.get("fp16", {}).get("enabled"):
        return "fp16"
    return "bf16" if cfg.get("bf16", {}).get("enabled") else "fp32"


DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast the parameters only, as DeepSpeed's fp16 / bf16 engine does (buffers stay as they are)."""
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return model


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(shared, experts) parameter counts of the single-device model: experts are DeepSpeed's expert parameters."""
    experts = count_parameters(p for layer in model.backbone.moe_layers for _, p in layer.expert_parameters())
    return count_parameters(model) - experts, experts


def saved_activation_bytes(model, step) -> dict[str, int]:
    """Bytes of the tensors autograd saves while ``step()`` runs a forward and its loss (each storage once,
    parameters excluded), and what activation checkpointing would keep of them: the tensors saved outside the
    backbone's checkpoint units, each unit's input, and the saved tensors of the largest unit, which backward
    recomputes one at a time (for DaViT, whose stages timm checkpoints around checkpointed blocks, an upper bound).
    Measured without checkpointing: ``{"plain": ..., "checkpointed": ...}``."""
    storages: dict[int, tuple[int, int]] = {}  # storage -> (bytes, unit index or -1)
    inputs: dict[int, int] = {}
    current = [-1]
    units = model.backbone.checkpoint_units()

    def enter(index):
        def hook(module, args):
            current[0] = index
            inputs.setdefault(args[0].untyped_storage().data_ptr(), args[0].untyped_storage().nbytes())
        return hook

    def leave(module, args, output):
        current[0] = -1

    def pack(tensor: torch.Tensor):
        if not isinstance(tensor, torch.nn.Parameter):
            storage = tensor.untyped_storage()
            storages.setdefault(storage.data_ptr(), (storage.nbytes(), current[0]))
        return tensor

    hooks = [h for i, unit in enumerate(units)
             for h in (unit.register_forward_pre_hook(enter(i)), unit.register_forward_hook(leave))]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            step()
    finally:
        for h in hooks:
            h.remove()
    per_unit = [0] * len(units)
    outside = 0
    for nbytes, unit in storages.values():
        if unit < 0:
            outside += nbytes
        else:
            per_unit[unit] += nbytes
    return {"plain": outside + sum(per_unit),
            "checkpointed": outside + sum(inputs.values()) + max(per_unit, default=0)}


def allocator_peak_bytes(model, step, device: torch.device) -> int:
    """On CUDA: the allocator's peak over ``step()`` and its backward above what was allocated before, less the
    parameter gradients backward made (the plan counts gradients with the ZeRO states). Unlike the saved tensors,
    this holds what lives only for a moment (a loss's full-resolution logits and their gradient, kernels'
    workspaces)."""
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step().backward()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    model.zero_grad(set_to_none=True)
    return peak - grads


def measure_activations(recipe: Recipe, batch_sizes: Sequence[int] = (1, 2), progress=print,
                        device: Optional[torch.device] = None) -> dict:
    """Per dataset: activation bytes at each batch size (real model, real input size, the recipe's precision),
    extrapolated to the recipe's batch; and the tokens and expert capacity of the first MoE call. Measured on
    ``device`` (default: this process's, see ``mthl_ds.runtime.device``): the saved tensors everywhere, with and without
    activation checkpointing, and on CUDA also the allocator's peak over forward and backward, which the plan then
    uses (without checkpointing)."""
    from mthl_ds.build import build_model, training_loss
    from mthl_ds.runtime.device import local_device, to_device
    from mthl_ds.tasks import fake_batch
    dtype = DTYPES[precision(recipe)]
    device = device or local_device()
    model = cast_parameters(build_model(recipe), dtype).to(device)
    model.backbone.set_grad_checkpointing(False)  # measured plainly; checkpointing's share is derived
    model.train()
    for m in model.modules():  # batch statistics of 1 x 1 pooled features need 2 values per channel; the saved
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):  # tensors are the same in eval mode
            m.eval()
    routes: list[tuple[int, int]] = []
    hooks = [layer.gate.register_forward_hook(
                 lambda gate, args, out: routes.append((args[0].shape[0], int(out.capacity))))
             for layer in model.backbone.moe_layers[:1]]
    kinds = ("plain", "checkpointed") + (("peak",) if device.type == "cuda" else ())
    key = "checkpointed" if recipe.model.grad_checkpointing else "peak" if device.type == "cuda" else "plain"
    result = {}
    for name, d in recipe.datasets.items():
        row = {"task": d.task, "recipe_batch": d.batch_size, "bytes": {}}
        for size in batch_sizes:
            routes.clear()
            batch = to_device(fake_batch(recipe, name, batch_size=size), device, dtype)

            def step():
                model.set_dataset(name)
                return training_loss(model, recipe, name, batch).loss

            row["bytes"][size] = saved_activation_bytes(model, step)
            if routes and size == batch_sizes[0]:
                row["tokens_per_moe_call"], row["capacity"] = routes[0]
            if device.type == "cuda":
                row["bytes"][size]["peak"] = allocator_peak_bytes(model, step, device)
        for kind in kinds:
            one, two = (row["bytes"][b][kind] for b in batch_sizes[:2])
            per_image = (two - one) / (batch_sizes[1] - batch_sizes[0])
            row[f"{kind}_at_recipe_batch"] = int(one + (d.batch_size - batch_sizes[0]) * per_image)
        row["at_recipe_batch"] = row[f"{key}_at_recipe_batch"]
        result[name] = row
        progress(f"memory: {name} activations at batch {d.batch_size}: {row['plain_at_recipe_batch'] / GIB:.2f} GiB, "
                 f"{row['checkpointed_at_recipe_batch'] / GIB:.2f} GiB with activation checkpointing")
    for hook in hooks:
        hook.remove()
    return result


def capacity_at(recipe: Recipe, name: str, tokens: int) -> int:
    """DeepSpeed's expert capacity for ``tokens`` tokens of dataset ``name`` in one MoE call (training)."""
    moe = recipe.model.moe
    k = recipe.top_k_per_dataset()[name]
    return max(math.ceil(tokens / moe.num_experts * moe.capacity_factor * k), moe.min_capacity)


def state_bytes(recipe: Recipe, shared: int, experts: int, gpus: int, ep_size: int) -> dict[str, int]:
    """Weights, gradients and optimizer states per GPU (the module docstring's formulas)."""
    cfg = read_ds_config(recipe.train.ds_config)
    zero = cfg.get("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    width = 4 if precision(recipe) == "fp32" else 2
    held = shared + experts / ep_size
    partition = shared / gpus + (experts / ep_size) / (gpus / ep_size) if stage >= 1 else held
    if stage == 2:
        bucket = int(zero.get("reduce_bucket_size", DEEPSPEED_REDUCE_BUCKET)) * width
        gradients = width * partition + bucket * (2 if zero.get("overlap_comm") else 1)
    else:
        gradients = width * held
    index = 4 if recipe.train.optimizer == "lamb" else 0  # mthl_ds.runtime.optim.PartitionLayout.on, every stage
    optimizer = (12 + index) * partition + (4 * held if stage == 0 and width == 2 else 0)
    return {"weights": int(width * held), "gradients": int(gradients), "optimizer": int(optimizer)}


def ep_candidates(num_experts: int, gpus: int) -> list[int]:
    return [e for e in range(1, num_experts + 1) if num_experts % e == 0 and gpus % e == 0]


def memory_plan(recipe: Recipe, activations: dict, shared: int, experts: int, gpus: int = 96,
                gpu_memory_gib: Sequence[float] = (16, 32), ep_sizes: Optional[Sequence[int]] = None) -> dict:
    """Per GPU, for each expert-parallel size: states, per-dataset totals and whether they fit each card."""
    moe = recipe.model.moe
    ep_sizes = list(ep_sizes or (ep_candidates(moe.num_experts, gpus) if moe else [1]))
    plans = []
    for ep in ep_sizes:
        states = state_bytes(recipe, shared, experts, gpus, ep)
        base = sum(states.values())
        totals = {name: base + a["at_recipe_batch"] for name, a in activations.items()}
        worst = max(totals.values())
        plans.append({"ep_size": ep, "states": states, "totals": totals,
                      "fits": {f"{g:g}": worst <= FIT_SHARE * g * GIB for g in gpu_memory_gib}})
    return {"recipe": recipe.name, "precision": precision(recipe), "gpus": gpus, "ep_chosen": recipe.train.ep_size,
            "grad_checkpointing": recipe.model.grad_checkpointing, "parameters": {"shared": shared, "experts": experts},
            "activations": activations, "plans": plans, "fit_share": FIT_SHARE}


def plan_recipe(recipe: Recipe, gpus: int = 96, gpu_memory_gib: Sequence[float] = (16, 32), progress=print) -> dict:
    """Measure the recipe's activations (fp16 on a CPU through ``mthl_ds.runtime.cpu_half``) and make its plan."""
    from mthl_ds.build import build_model
    if precision(recipe) == "fp16" and not torch.cuda.is_available():
        from mthl_ds.runtime import cpu_half
        cpu_half.enable()
    shared, experts = parameter_counts(build_model(recipe))
    return memory_plan(recipe, measure_activations(recipe, progress=progress), shared, experts, gpus, gpu_memory_gib)


def format_plan(plan: dict) -> str:
    g = lambda n: f"{n / GIB:.2f}"  # noqa: E731
    names = list(plan["activations"])
    cards = list(plan["plans"][0]["fits"])
    lines = [f"memory plan per GPU: {plan['recipe']}, {plan['gpus']} GPUs, {plan['precision']}, grad checkpointing "
             f"{'on' if plan['grad_checkpointing'] else 'off'}; recipe ep_size {plan['ep_chosen']}; GiB",
             "| ep_size | weights | gradients | optimizer | " + " | ".join(
                 f"{n} act. @{plan['activations'][n]['recipe_batch']} | {n} total" for n in names)
             + " | " + " | ".join(f"fits {c} GB" for c in cards) + " |",
             "|" + "---|" * (4 + 2 * len(names) + len(cards))]
    for p in plan["plans"]:
        s = p["states"]
        acts = " | ".join(f"{g(plan['activations'][n]['at_recipe_batch'])} | {g(p['totals'][n])}" for n in names)
        fits = " | ".join("yes" if p["fits"][c] else "no" for c in cards)
        lines.append(
            f"| {p['ep_size']} | {g(s['weights'])} | {g(s['gradients'])} | {g(s['optimizer'])} | {acts} | {fits} |")
    return "\n".join(lines)

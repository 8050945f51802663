"""``mthl-ds bench launches``: the kernels a training step asks the host to launch, counted without a GPU.

At the paper's per-GPU batches a GPU waits on the host that launches its kernels (one H200, Swin-T at batch 64,
bf16: busy 46% of a trainer step; README, "On a GPU"), so the step time follows the number of launches more
than the FLOPs. Every aten op dispatched in one ImageNet step is counted, by phase (forward and loss, backward,
optimizer step, the trainer's bookkeeping after it), views and other aliases left out: each op left is a kernel
on a GPU, a multi-tensor (``_foreach_*``) op a few kernels for hundreds of tensors. The candidates are
:meth:`mthl_ds.train.Trainer.train_step` itself (DeepSpeed ZeRO 2, our LAMB) for MTHL.D, MTHL with capacity
dispatch and MTHL with dropless dispatch, each against the bare timm Swin-T loop of G6 (autocast, our LAMB on
whole tensors, one multi-tensor chunk as on a GPU). The MoE layers run their experts as this device runs them
(named in the row); on the CPU MTHL capacity is counted a second time with its experts batched, the form it
takes on a GPU.

Each row also gives the bytes the step's ops touch (:func:`touched_bytes`): with ``--batches imagenet=64`` the
memory traffic of a step at the paper's batch, which over a GPU's bandwidth gives about the time its kernels would
take if they were all memory-bound, to set against the step time (README, "On a GPU").
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable

from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from mthl_ds.studies.bench.gpu import (PAPER_BATCHES, PRECISIONS, bare_loop, bench_recipe, bench_trainer, release,
                                       trainer_step)

PHASES = ("forward", "backward", "step", "after step")
COLUMNS = ["candidate", "precision", "dispatch", *PHASES, "total", "ratio", "GB touched", "GB ratio"]
CPU_BATCHES = {"imagenet": 2, "coco": 1, "ade20k": 2}


class LaunchCount(TorchDispatchMode):
    """Counts the aten ops dispatched under it and the bytes they touch (:func:`touched_bytes`), per :attr:`phase`,
    leaving out ops that return an alias of an input (views, ``detach``): no kernel runs for them."""

    def __init__(self):
        super().__init__()
        self.phase = PHASES[0]
        self.counts = {p: 0 for p in PHASES}
        self.bytes = {p: 0 for p in PHASES}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not func.is_view:
            self.counts[self.phase] += 1
            self.bytes[self.phase] += touched_bytes(func, args, kwargs, out)
        return out

    def mark(self, phase: str) -> None:
        self.phase = phase

    def mark_engine(self, engine) -> None:
        """Wrap the DeepSpeed engine's ``backward`` and ``step`` (this instance's) so that each marks its phase,
        and the next one when it returns."""
        for name in ("backward", "step"):
            def wrapped(*args, _original=getattr(engine, name), _name=name, **kwargs):
                self.mark(_name)
                try:
                    return _original(*args, **kwargs)
                finally:
                    self.mark(PHASES[PHASES.index(_name) + 1])
            setattr(engine, name, wrapped)


def tensor_bytes(tree) -> int:
    return sum(t.numel() * t.element_size() for t in tree_flatten(tree)[0] if isinstance(t, Tensor))


def touched_bytes(func, args: tuple, kwargs: dict, out) -> int:
    """The bytes an aten op reads and writes, as its tensors hold them: every tensor argument read, every
    argument it mutates written back, every result that is not one of its arguments written. For a kernel that
    reads only part of an input (``index_select``) or overwrites without reading (``copy_``, ``out=``) that is
    more than it moves; matmul operands count once, as a kernel that tiles them reads them from cache."""
    schema = func._schema
    given = {**dict(zip((a.name for a in schema.arguments), args)), **kwargs}
    written = [given.get(a.name) for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    results = out if len(schema.returns) > 1 else (out,) if schema.returns else ()
    fresh = [r for r, spec in zip(results, schema.returns) if spec.alias_info is None]
    return tensor_bytes((args, kwargs)) + tensor_bytes(written) + tensor_bytes(fresh)


def counted(step: Callable[[], None], counter: LaunchCount) -> LaunchCount:
    """``counter`` with the ops and bytes per phase of ``step()``, after two uncounted steps (first-step
    allocations and caches left out)."""
    step()
    step()
    counter.mark(PHASES[0])
    with counter:
        step()
    return counter


def run(recipe: str = "mthl_swin_t", precisions: tuple[str, ...] = ("bf16",),
        batches: dict[str, int] | None = None) -> list[dict]:
    """Per precision, one row per candidate (the bare loop first), counting an ImageNet step on this process's
    device; ``batches`` per dataset (default: the paper's per-GPU batches with CUDA, small ones on the CPU: the
    counts do not depend on the batch)."""
    from mthl_ds.runtime import cpu_half
    from mthl_ds.runtime.device import local_device
    from mthl_ds.runtime.engine import init_distributed
    unknown = set(precisions) - set(PRECISIONS)
    if unknown:
        raise ValueError(f"unknown precision(s) {sorted(unknown)}; choose from {sorted(PRECISIONS)}")
    init_distributed()
    device = local_device()
    batches = dict(batches or (CPU_BATCHES if device.type == "cpu" else PAPER_BATCHES))
    if "fp16" in precisions:
        cpu_half.enable()  # DeepSpeed's fp16 on a CPU rank (does nothing where CUDA is)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for precision in precisions:
            rows += precision_rows(recipe, precision, batches, device, Path(tmp))
    return rows


def precision_rows(recipe: str, precision: str, batches: dict[str, int], device, folder: Path) -> list[dict]:
    from mthl_ds.studies.model_info import dense_twin
    capacity = bench_recipe(recipe, precision, folder, batches)
    step, optimizer = bare_loop(dense_twin(capacity), device, PRECISIONS[precision])
    optimizer.cpu_chunk_numel = 0  # one multi-tensor chunk, as on a GPU
    counter = LaunchCount()
    base = counted(lambda: step(counter.mark), counter)
    rows = [launch_row("bare timm Swin-T loop", precision, "", base, base)]
    candidates = [("MTHL.D", dense_twin(capacity), None), ("MTHL", capacity, None),
                  ("MTHL", bench_recipe(recipe, precision, folder, batches, dispatch="dropless"), None)]
    if device.type == "cpu":  # also the capacity experts as a GPU runs them
        candidates.insert(2, ("MTHL", capacity, "batched"))
    for label, r, experts in candidates:
        trainer = bench_trainer(r, folder)
        for layer in trainer.model.backbone.moe_layers:
            layer.capacity_experts = experts
        counter = LaunchCount()
        counter.mark_engine(trainer.engine)
        counted(trainer_step(trainer, "imagenet", 1), counter)
        dispatch = f"capacity (experts: {experts})" if experts else trainer.moe_dispatch()
        rows.append(launch_row(f"{label} through the trainer", precision, dispatch, counter, base))
        release(trainer)
    return rows


def launch_row(candidate: str, precision: str, dispatch: str, counter: LaunchCount, base: LaunchCount) -> dict:
    total, touched = sum(counter.counts.values()), sum(counter.bytes.values())
    return {"candidate": candidate, "precision": precision, "dispatch": dispatch, **counter.counts, "total": total,
            "ratio": round(total / sum(base.counts.values()), 2), "GB touched": round(touched / 1e9, 2),
            "GB ratio": round(touched / sum(base.bytes.values()), 2)}

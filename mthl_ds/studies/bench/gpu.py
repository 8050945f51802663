"""``mthl-ds bench gpu`` (and the GPU rows of ``mthl-ds bench``): Swin-T at the paper's per-GPU batches {64, 2, 2}
on one CUDA GPU, in bf16 and fp16, each candidate timed against its baseline in one process (alternating).

    G1  training step through our trainer (DeepSpeed ZeRO 2, LAMB), MTHL vs MTHL.D   target <= 1.15 (FLOPs 1.01)
        (MTHL with capacity dispatch, and with dropless)
    G2  MFU of those steps against the matmul peak measured here                    target >= 25% (ImageNet)
    G3  peak memory of a step above the engine's states, against the plan's activations
    G4  MoE MLP fwd+bwd (capacity, dropless) vs the FLOPs-matched dense MLP,       target <= 1.3 bf16, 1.5 fp16
        Swin-T widths 96-768
    G5  our LAMB vs DeepSpeed's FusedLamb on the Swin-T MTHL parameters              target <= 1.2
    G6  trainer overhead: MTHL.D's step vs a bare timm Swin-T loop                   target <= 1.05

The trainer's step is :meth:`mthl_ds.train.Trainer.train_step` itself, fed one pinned batch from memory, so the
data pipeline is not timed (``mthl-ds bench data --real-size`` times it).
"""
from __future__ import annotations

import gc
import itertools
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from mthl_ds.config import Recipe, load_recipe
from mthl_ds.models.counting import count_flops
from mthl_ds.runtime.device import pin_memory, to_device
from mthl_ds.runtime.optim import Lamb
from mthl_ds.studies.bench.common import side_by_side
from mthl_ds.studies.bench.suite import fwd_bwd, matmul_peak, row
from mthl_ds.tasks import fake_batch

PAPER_BATCHES = {"imagenet": 64, "coco": 2, "ade20k": 2}
PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16}
SWIN_T_WIDTHS = ((96, 56), (192, 28), (384, 14), (768, 7))  # (width, side of the stage at 224) of Swin-T


@dataclass
class Setup:
    """What every G row runs on: a recipe, its per-GPU batches, a device, a scratch folder, repeats."""
    recipe: str
    batches: dict[str, int]
    device: torch.device
    folder: Path
    repeats: int


class OneDataset:
    """A sampler that always answers ``name`` (the trainer asks ``dataset_at(step)``)."""

    def __init__(self, name: str):
        self.name = name

    def dataset_at(self, step: int) -> str:
        return self.name


def ds_config(precision: str, folder: Path, stage: int = 2) -> str:
    """The repo's ZeRO 2 config of ``precision`` (``stage`` 1: ZeRO 1 without overlap, which reduces gradients
    after backward instead of from per-parameter hooks); fp16 starts at a loss scale of 2^8, so random batches do
    not overflow and every timed step is a full one."""
    from mthl_ds.config import read_ds_config
    cfg = read_ds_config(f"zero2_{precision}.json")
    if precision == "fp16":
        cfg["fp16"]["initial_scale_power"] = 8
    if stage == 1:
        cfg["zero_optimization"] = {"stage": 1}
    path = folder / f"zero{stage}_{precision}.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def bench_recipe(name: str, precision: str, folder: Path, batches: dict[str, int], stage: int = 2,
                 dispatch: str = "capacity") -> Recipe:
    return load_recipe(name, [f"train.ds_config={ds_config(precision, folder, stage)}", "train.ep_size=1",
                              "train.steps=1000000", "train.warmup_steps=10", "train.log_every=1000000",
                              f"model.moe.dispatch={dispatch}"]
                       + [f"datasets.{n}.batch_size={b}" for n, b in batches.items()])


def bench_trainer(recipe: Recipe, folder: Path):
    """A :class:`Trainer` with its engine built and one pinned batch per dataset in place of the loaders."""
    from mthl_ds.build import build_model
    from mthl_ds.train import Trainer
    trainer = Trainer(recipe, folder / recipe.name)
    torch.manual_seed(0)
    trainer.build(build_model(recipe))
    pin = (lambda t: t.pin_memory()) if pin_memory() else (lambda t: t)  # noqa: E731
    trainer.loaders = {n: itertools.repeat({k: pin(v) if isinstance(v, torch.Tensor) else [pin(t) for t in v]
                                            for k, v in fake_batch(recipe, n).items()}) for n in recipe.datasets}
    return trainer


def release(*trainers) -> None:
    """Free what each trainer's engine holds (weights, optimizer states, gradient buffers) now
    (``Trainer.close``), so that benchmarks that build one trainer after another hold one at a time."""
    for trainer in trainers:
        trainer.close()
    gc.collect()


def trainer_step(trainer, name: str, steps: int = 2):
    """``steps`` of the trainer on dataset ``name`` (its figures dropped, as if never logged)."""
    def run():
        trainer.sampler = OneDataset(name)
        for _ in range(steps):
            trainer.train_step(trainer.step)
            trainer.step += 1
        trainer.pending.clear()
    return run


def step_flops(recipe: Recipe, name: str, dtype: torch.dtype, device: torch.device) -> int:
    """FLOPs of one training forward + backward (torch's counter) of a plain copy of the recipe's model."""
    from mthl_ds.build import build_model, training_loss
    from mthl_ds.studies.memory import cast_parameters
    model = cast_parameters(build_model(recipe), dtype).to(device)  # buffers stay float32, as in the engine
    batch = to_device(fake_batch(recipe, name), device, dtype)
    model.set_dataset(name)
    return count_flops(lambda: training_loss(model, recipe, name, batch).loss.backward())


def trainer_rows(setup: Setup, precision: str, peak: float) -> list[dict]:
    """G1, G2, G3 for one precision."""
    from mthl_ds.studies.memory import measure_activations
    from mthl_ds.studies.model_info import dense_twin
    dtype = PRECISIONS[precision]
    recipes = {"MTHL": bench_recipe(setup.recipe, precision, setup.folder, setup.batches)}
    recipes["MTHL.D"] = dense_twin(recipes["MTHL"])
    recipes["MTHL dropless"] = bench_recipe(setup.recipe, precision, setup.folder, setup.batches, dispatch="dropless")
    flops = {k: {n: step_flops(r, n, dtype, setup.device) for n in setup.batches} for k, r in recipes.items()}
    activations = measure_activations(recipes["MTHL"], progress=lambda _: None, device=setup.device)
    trainers = {k: bench_trainer(r, setup.folder) for k, r in recipes.items()}
    rows = []
    for name, size in setup.batches.items():
        steps = {k: trainer_step(t, name) for k, t in trainers.items()}
        per_step = {}
        shape = f"{name} batch {size}, {precision}"
        for model in ("MTHL", "MTHL dropless"):
            r = side_by_side(steps[model], steps["MTHL.D"], setup.repeats)
            per_step.update({model: r["candidate_s"] / 2, "MTHL.D": r["baseline_s"] / 2})
            flops_ratio = flops[model][name] / flops["MTHL.D"][name]
            label = "MTHL" if model == "MTHL" else f"MTHL dropless ({trainers[model].moe_dispatch()})"
            rows.append(row("G1", f"train step through the trainer (ZeRO 2, LAMB), {shape}",
                            f"{label} {size / per_step[model]:.0f} img/s",
                            f"MTHL.D {size / per_step['MTHL.D']:.0f} img/s",
                            r["ratio_median"], (r["ratio_min"], r["ratio_max"]), "<= 1.15", r["ratio_median"] <= 1.15,
                            f"FLOPs ratio {flops_ratio:.3f}; "
                            f"{1e3 * per_step[model]:.1f} vs {1e3 * per_step['MTHL.D']:.1f} ms",
                            precision=precision, dataset=name, model=model))
        for model, seconds in ((k, per_step[k]) for k in ("MTHL", "MTHL.D")):
            mfu = flops[model][name] / seconds / peak
            imagenet = name == "imagenet"
            rows.append(row("G2", f"{model} train-step MFU, {shape}",
                            f"{flops[model][name] / seconds / 1e12:.1f} TFLOP/s",
                            f"matmul peak {peak / 1e12:.0f} TFLOP/s", mfu, target=">= 0.25" if imagenet else "",
                            met=mfu >= 0.25 if imagenet else None, work="fwd+bwd FLOPs / trainer step time",
                            mfu=mfu, precision=precision, dataset=name, model=model))
        if setup.device.type == "cuda":
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            trainer_step(trainers["MTHL"], name, 1)()
            torch.cuda.synchronize()
            above = torch.cuda.max_memory_allocated() - before
            planned = activations[name]["at_recipe_batch"]
            rows.append(row("G3", f"MTHL step memory above the engine's states, {shape}", f"{above / 2 ** 30:.2f} GiB",
                            f"plan: activations {planned / 2 ** 30:.2f} GiB", above / planned,
                            work="max_memory_allocated - memory_allocated before the step", precision=precision,
                            dataset=name))
    release(*trainers.values())
    return rows


def moe_layer_rows(setup: Setup, precision: str) -> list[dict]:
    """G4: one MoE MLP (E=12, K=4), capacity (factor 1) and dropless, against the dense MLP of the same FLOPs, at
    each Swin-T stage width with the token count of the ImageNet batch. Target: 1.3x in bf16, 1.5x in fp16."""
    from timm.layers import Mlp

    from mthl_ds.moe.grouped import backend
    from mthl_ds.studies.bench.moe import ours
    from mthl_ds.studies.memory import cast_parameters
    dtype = PRECISIONS[precision]
    limit = 1.3 if precision == "bf16" else 1.5
    rows = []
    for dim, side in SWIN_T_WIDTHS:
        tokens = setup.batches["imagenet"] * side * side
        x = torch.randn(tokens, dim, device=setup.device, dtype=dtype, requires_grad=True)
        dense = cast_parameters(Mlp(dim, 4 * dim), dtype).to(setup.device)
        for dispatch in ("capacity", "dropless"):
            moe = cast_parameters(ours(dim, dispatch), dtype).to(setup.device).train()  # as DeepSpeed casts
            r = side_by_side(fwd_bwd(moe, x), fwd_bwd(dense, x), setup.repeats)
            label = dispatch if dispatch == "capacity" else f"dropless ({backend(x.device, dtype)})"
            rows.append(row("G4", f"MoE MLP fwd+bwd vs dense MLP, d={dim}, {tokens} tokens, {precision}",
                            f"E=12, K=4, {label}: {1e3 * r['candidate_s']:.2f} ms",
                            f"dense: {1e3 * r['baseline_s']:.2f} ms", r["ratio_median"],
                            (r["ratio_min"], r["ratio_max"]), f"<= {limit}", r["ratio_median"] <= limit,
                            precision=precision, dispatch=dispatch))
    return rows


def lamb_rows(setup: Setup) -> list[dict]:
    """G5: one step on the Swin-T MTHL parameters (fp32, as ZeRO's master copy) with random gradients: DeepSpeed's
    FusedLamb on whole tensors, ours on whole tensors and on one flat ZeRO partition."""
    from deepspeed.ops.lamb import FusedLamb

    from mthl_ds.build import build_model
    from mthl_ds.runtime.optim import PartitionLayout
    source = [p.detach().to(setup.device) for p in build_model(load_recipe(setup.recipe)).parameters()]

    def params():
        out = [torch.nn.Parameter(p.clone()) for p in source]
        for p in out:
            p.grad = torch.randn_like(p) * 1e-3
        return out

    flat = torch.nn.Parameter(torch.cat([p.flatten() for p in source]))
    flat.grad = torch.randn_like(flat) * 1e-3
    partitioned = Lamb([flat], lr=1e-3, weight_decay=0.05)
    partitioned.layouts[flat] = PartitionLayout([p.numel() for p in source], torch.arange(len(source)), len(source))
    ours = Lamb(params(), lr=1e-3, weight_decay=0.05)
    numel = sum(p.numel() for p in source)
    benchmark = f"LAMB step, {setup.recipe} ({numel / 1e6:.1f}M params, {len(source)} tensors)"
    try:  # DeepSpeed compiles its CUDA op on first use (nvcc, ninja)
        fused = FusedLamb(params(), lr=1e-3, weight_decay=0.05)
    except Exception as e:  # noqa: BLE001  (the build's own error, reported in the row)
        return [row("G5", benchmark, "", f"FusedLamb unavailable: {type(e).__name__}: {str(e)[:200]}")]
    rows = []
    for label, optimizer in (("mthl_ds Lamb, whole tensors", ours), ("mthl_ds Lamb, one ZeRO partition", partitioned)):
        r = side_by_side(optimizer.step, fused.step, setup.repeats)
        rows.append(row("G5", benchmark, f"{label}: {1e3 * r['candidate_s']:.2f} ms",
                        f"FusedLamb: {1e3 * r['baseline_s']:.2f} ms",
                        r["ratio_median"], (r["ratio_min"], r["ratio_max"]), "<= 1.2", r["ratio_median"] <= 1.2))
    return rows


def bare_loop(recipe: Recipe, device: torch.device, dtype: torch.dtype) -> tuple[Callable[..., None], Lamb]:
    """G6's baseline: one step of timm's Swin-T at the recipe's ImageNet size, classes and batch, autocast in
    ``dtype`` over fp32 weights, our LAMB on whole tensors. Returns ``(step, optimizer)``; ``step(mark)`` calls
    ``mark(phase)`` as each of forward, backward, step and "after step" begins."""
    import timm
    net = timm.create_model("swin_tiny_patch4_window7_224", num_classes=recipe.datasets["imagenet"].num_classes,
                            img_size=recipe.datasets["imagenet"].size).to(device)
    optimizer = Lamb(net.parameters(), lr=1e-4, weight_decay=0.05)
    batch = to_device(fake_batch(recipe, "imagenet"), device)

    def step(mark: Callable[[str], None] = lambda phase: None) -> None:
        optimizer.zero_grad(set_to_none=True)
        mark("forward")
        with torch.autocast(device.type, dtype=dtype):
            loss = F.cross_entropy(net(batch["image"]).float(), batch["label"])
        mark("backward")
        loss.backward()
        mark("step")
        optimizer.step()
        mark("after step")
    return step, optimizer


def overhead_rows(setup: Setup, precision: str) -> list[dict]:
    """G6: MTHL.D's ImageNet step through our trainer against :func:`bare_loop` at the same batch and precision."""
    from mthl_ds.studies.model_info import dense_twin
    trainers = {stage: bench_trainer(dense_twin(bench_recipe(setup.recipe, precision, setup.folder, setup.batches,
                                                             stage)), setup.folder) for stage in (2, 1)}
    size = setup.batches["imagenet"]
    step, _ = bare_loop(trainers[2].recipe, setup.device, PRECISIONS[precision])

    def bare():
        step()
        step()

    rows = []
    for stage, trainer in trainers.items():
        r = side_by_side(trainer_step(trainer, "imagenet"), bare, setup.repeats)
        rows.append(row("G6", f"trainer overhead: MTHL.D ImageNet step, batch {size}, {precision}, ZeRO {stage}",
                        f"our trainer: {size * 2 / r['candidate_s']:.0f} img/s",
                        f"bare timm loop: {size * 2 / r['baseline_s']:.0f} img/s", r["ratio_median"],
                        (r["ratio_min"], r["ratio_max"]), "<= 1.05", r["ratio_median"] <= 1.05,
                        f"DeepSpeed ZeRO {stage} ({precision} weights, fp32 master) vs autocast", precision=precision))
    release(*trainers.values())
    return rows


def profile_rows(setup: Setup, precision: str) -> list[dict]:
    """G7: where a trainer step of MTHL and of MTHL.D (ImageNet) spends its time: the GPU's busy share of the
    step's wall time (low: the host, launching kernels, is the limit) and the ops with the most GPU time."""
    from torch.profiler import ProfilerActivity, profile

    from mthl_ds.studies.model_info import dense_twin
    recipe = bench_recipe(setup.recipe, precision, setup.folder, setup.batches)
    rows = []
    for model, r in (("MTHL", recipe), ("MTHL.D", dense_twin(recipe))):
        trainer = bench_trainer(r, setup.folder)
        run = trainer_step(trainer, "imagenet", 2)
        run()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if setup.device.type == "cuda" else [])
        if setup.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with profile(activities=activities) as prof:
            run()
            if setup.device.type == "cuda":
                torch.cuda.synchronize()
        wall = time.perf_counter() - start
        events = prof.key_averages()
        device_s = lambda e: getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) / 1e6  # noqa
        busy = sum(device_s(e) for e in events)
        top = sorted(events, key=device_s, reverse=True)[:8]
        rows.append(row("G7", f"where an {model} ImageNet trainer step goes, batch {setup.batches['imagenet']}, "
                        f"{precision} (profiled)", f"GPU busy {100 * busy / wall:.0f}% of {1e3 * wall / 2:.0f} ms",
                        "", busy / wall, work="most GPU time: " + ", ".join(
                            f"{e.key} {100 * device_s(e) / max(busy, 1e-9):.0f}%" for e in top),
                        precision=precision, model=model))
        release(trainer)
    return rows


def gpu_rows(repeats: int = 5, precisions: tuple[str, ...] = ("bf16", "fp16"), progress=print,
             recipe: str = "mthl_swin_t", batches: dict[str, int] = PAPER_BATCHES) -> list[dict]:
    """Every G row on this process's device (one rank, the process group made here if none exists). ``recipe`` and
    ``batches`` default to the paper's Swin-T run; smaller ones check the code on a CPU."""
    from mthl_ds.runtime.device import local_device
    from mthl_ds.runtime.engine import init_distributed
    init_distributed()
    device = local_device()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        setup = Setup(recipe, dict(batches), device, Path(tmp), repeats)
        for precision in precisions:
            dtype = PRECISIONS[precision]
            peak = matmul_peak(8192 if device.type == "cuda" else 512, repeats=10, dtype=dtype, device=device.type)
            name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
            rows.append(row("peak", f"matmul {precision}, {name}", f"{peak / 1e12:.1f} TFLOP/s", "",
                            peak_flop_per_s=peak, precision=precision))
            parts = [lambda: trainer_rows(setup, precision, peak), lambda: overhead_rows(setup, precision),
                     lambda: moe_layer_rows(setup, precision)]
            if precision == precisions[0]:  # the targets first (G1, G5, G6), then the parts that explain them
                parts[1:1] = [lambda: lamb_rows(setup)]
                parts.append(lambda: profile_rows(setup, precision))
            for part in parts:
                new = part()
                rows += new
                for r in new:  # as they come: a run stopped at its time limit still shows what it measured
                    progress(json.dumps(r))
    return rows

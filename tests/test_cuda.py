"""Training on a CUDA GPU, one rank: every head in fp16 and bf16 through the real trainer and DeepSpeed engine, a
ZeRO-2 run that resumes bitwise, the steady-state step without a host sync, and the memory plan against the
allocator's peak. ``pytest -m cuda``; collected everywhere, skipped where CUDA is not available (conftest.py).
Evaluation and prediction on CUDA against the CPU are tests/test_cuda_inference.py's."""
import gc
import json
import shutil
import warnings

import pytest
import torch
from conftest import ROOT, demo_overrides

from mthl_ds.config import load_recipe

pytestmark = pytest.mark.cuda

CYCLE = "train.dataset_cycle=[imagenet,coco,ade20k]"


def fp16_config(folder) -> str:
    """The repo's fp16 ZeRO 2 config starting at a loss scale of 2^10, so a demo step does not overflow by itself."""
    cfg = json.loads((ROOT / "ds_configs" / "zero2_fp16.json").read_text())
    cfg["fp16"]["initial_scale_power"] = 10
    path = folder / "fp16_2p10.json"
    path.write_text(json.dumps(cfg))
    return str(path)


@pytest.fixture
def built():
    """The trainers a test builds, each closed after the test (``Trainer.close``; ``run`` closes its own): an
    engine's ZeRO gradient hooks would keep it, and the GPU memory it holds, alive into the tests that follow."""
    from mthl_ds.studies.bench.gpu import release
    trainers = []
    yield trainers
    release(*trainers)


def trainer(built, shards, run_dir, *overrides, **train):
    """The demo recipe's trainer on the test shards, one rank, every dataset in turn (added to ``built``);
    ``train`` sets train.* values, ``overrides`` any other."""
    from mthl_ds.train import Trainer
    overrides = demo_overrides(shards, **{"ep_size": 1, **train}) + [CYCLE, *overrides]
    built.append(Trainer(load_recipe("demo", overrides), run_dir))
    return built[-1]


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_one_training_step_of_every_head(built, shards, tmp_path, precision):
    config = fp16_config(tmp_path) if precision == "fp16" else "zero2_bf16.json"
    t = trainer(built, shards, tmp_path / "run", steps=3, ds_config=config)
    results = t.run()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    assert [h["dataset"] for h in t.history] == ["imagenet", "coco", "ade20k"]
    assert not any(h.get("skipped") for h in t.history), t.history
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in t.history)
    assert t.model.dtype == dtype and next(t.model.parameters()).device.type == "cuda"
    assert set(results) == {"imagenet", "coco", "ade20k"}


def checkpoint_tensors(ckpt):
    tensors = dict(torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"])
    for f in sorted(ckpt.glob("layer_*_expert_*_model_states.pt")):
        tensors.update(torch.load(f, map_location="cpu", weights_only=False))
    return tensors


def test_zero2_run_resumes_bitwise(built, shards, tmp_path):
    """bf16 ZeRO 2 with ``train.deterministic``, training ImageNet and COCO steps: UperNet's bilinear upsampling and
    adaptive average pooling have no deterministic backward on CUDA (torch says so with a warning)."""
    train = dict(steps=6, ckpt_every=3, keep_checkpoints=3, ds_config="zero2_bf16.json", deterministic=True)
    cycle = ["train.dataset_cycle=[imagenet,coco]"]
    from mthl_ds.train import Trainer
    overrides = demo_overrides(shards, **{"ep_size": 1, **train}) + cycle
    straight = Trainer(load_recipe("demo", overrides), tmp_path / "straight")
    built.append(straight)
    straight.run()
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "straight", resumed_dir)
    shutil.rmtree(resumed_dir / "checkpoints" / "step00000006")
    (resumed_dir / "checkpoints" / "latest_complete").write_text("step00000003\n")
    resumed = Trainer(load_recipe("demo", overrides), resumed_dir)
    built.append(resumed)
    resumed.run()
    assert [h["step"] for h in resumed.history] == list(range(6))  # steps 0-2 read back, 3-5 run again
    assert [h["loss"] for h in straight.history] == [h["loss"] for h in resumed.history]
    a = checkpoint_tensors(tmp_path / "straight" / "checkpoints" / "step00000006")
    b = checkpoint_tensors(resumed_dir / "checkpoints" / "step00000006")
    assert set(a) == set(b)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:10]


def sync_sites(run) -> list[str]:
    """``file:line`` of every host sync ``run()`` makes (torch's sync debug mode, "warn"), with the message."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sorted({f"{w.filename}:{w.lineno}: {str(w.message)[:60]}" for w in caught
                   if "synchroniz" in str(w.message)})


@pytest.mark.parametrize("dispatch", ["capacity", "dropless"])
def test_steady_state_trainer_step_makes_no_host_sync_in_our_code(built, shards, tmp_path, capsys, dispatch):
    """The trainer's step (bf16 ZeRO 2, ``check_grad_overflow`` off: LAMB skips a non-finite step on the device),
    after two warm-up steps per dataset (first-call allocations, the anchor cache, the optimizer's step count):
    no sync comes from mthl_ds. DeepSpeed's own (its engine and ZeRO code) are printed for the GPU report.
    Dropless where its experts run as ``torch._grouped_mm`` (sm90); looped, they read each layer's counts."""
    from mthl_ds.moe.grouped import grouped_mm_works
    if dispatch == "dropless" and not grouped_mm_works(torch.device("cuda"), torch.bfloat16):
        pytest.skip(f"torch._grouped_mm does not run in bf16 on {torch.cuda.get_device_name()} with torch "
                    f"{torch.__version__}: dropless experts are looped here, reading each layer's counts")
    t = trainer(built, shards, tmp_path / "run", f"model.moe.dispatch={dispatch}", steps=100, log_every=1000,
                ds_config="zero2_bf16.json")
    t.setup()
    for step in range(6):
        t.pending.append(t.train_step(step))

    def steps():
        for step in range(6, 9):
            t.pending.append(t.train_step(step))

    sites = sync_sites(steps)
    ours = [s for s in sites if "/mthl_ds/" in s or "/tests/" in s]
    with capsys.disabled():
        print("\nhost syncs of a steady-state trainer step, outside mthl_ds:\n  " + "\n  ".join(
            [s for s in sites if s not in ours] or ["none"]))
    assert not ours, "host syncs in mthl_ds's part of the step:\n" + "\n".join(ours)


@pytest.mark.parametrize("dispatch, dtype", [("capacity", torch.float32), ("dropless", torch.bfloat16)])
def test_model_and_lamb_step_run_under_sync_debug_error(dispatch, dtype):
    """Our whole step without DeepSpeed: forward, task + router losses, the non-finite flag, backward, LAMB (whole
    tensors), the routing-buffer fold and the usage count, under ``set_sync_debug_mode("error")`` after a warm-up.
    Dropless in bf16 where its experts run as ``torch._grouped_mm`` (sm90); elsewhere they are looped, which reads
    each layer's counts on the host by design."""
    from mthl_ds.build import build_model
    from mthl_ds.moe.grouped import grouped_mm_works
    from mthl_ds.runtime.device import to_device
    from mthl_ds.runtime.engine import optimizer_groups
    from mthl_ds.runtime.optim import Lamb
    from mthl_ds.studies.memory import cast_parameters
    from mthl_ds.tasks import fake_batch
    if dispatch == "dropless" and not grouped_mm_works(torch.device("cuda"), dtype):
        pytest.skip(f"torch._grouped_mm does not run in {dtype} on {torch.cuda.get_device_name()} with torch "
                    f"{torch.__version__}: dropless experts are looped here, reading each layer's counts")
    recipe = load_recipe("demo", [f"model.moe.dispatch={dispatch}"])
    model = cast_parameters(build_model(recipe), dtype).cuda().train()
    optimizer = Lamb(optimizer_groups(model, 0.05), lr=1e-3)
    batches = {n: to_device(fake_batch(recipe, n), torch.device("cuda"), dtype) for n in recipe.datasets}
    usage = torch.zeros(len(model.backbone.moe_layers), recipe.model.moe.num_experts, device="cuda")

    def step(name):
        model.set_dataset(name)
        optimizer.zero_grad(set_to_none=True)
        loss, parts = model.heads[name].loss(model(batches[name]["image"]), batches[name])
        loss = loss + model.backbone.router_loss()
        optimizer.apply_mask = torch.isfinite(loss.detach())
        loss.backward()
        optimizer.step()
        model.backbone.update_routing_buffers(None, optimizer.apply_mask)
        for layer, row in zip(model.backbone.moe_layers, usage):
            row += layer.gate.counts.float() * optimizer.apply_mask
        return [loss.detach(), *parts.values()]

    for name in list(recipe.datasets) * 2:
        step(name)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        figures = [f for name in recipe.datasets for f in step(name)]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(torch.stack(figures)).all()


def test_memory_plan_matches_the_allocator_peak(capsys):
    """``mthl_swin_t`` at the paper's per-GPU batches {64, 2, 2}, fp16 ZeRO 2 on one GPU: the plan for one GPU
    (ZeRO states + activations measured on this GPU) against ``torch.cuda.max_memory_allocated`` of a real engine
    step above what was allocated before the engine, within 15% per dataset."""
    from mthl_ds.build import build_model
    from mthl_ds.runtime.device import to_device
    from mthl_ds.runtime.engine import build_engine, init_distributed
    from mthl_ds.studies.memory import measure_activations, memory_plan, parameter_counts
    from mthl_ds.tasks import fake_batch
    batches = {"imagenet": 64, "coco": 2, "ade20k": 2}
    recipe = load_recipe("mthl_swin_t", ["train.ep_size=1"] + [f"datasets.{n}.batch_size={b}"
                                                               for n, b in batches.items()])
    shared, experts = parameter_counts(build_model(recipe))
    plan = memory_plan(recipe, measure_activations(recipe, progress=lambda _: None), shared, experts, gpus=1,
                       ep_sizes=[1])["plans"][0]
    init_distributed()
    gc.collect()  # what earlier tests left is not this engine's
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    engine, _, _ = build_engine(build_model(recipe), recipe)
    model = engine.module
    states = torch.cuda.memory_allocated() - base
    measured = {}
    try:
        for name in batches:
            batch = to_device(fake_batch(recipe, name), torch.device("cuda"), model.dtype)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            model.set_dataset(name)
            loss = model.heads[name].loss(engine(batch["image"]), batch)[0] + model.backbone.router_loss()
            engine.backward(loss)
            engine.step()
            torch.cuda.synchronize()
            measured[name] = torch.cuda.max_memory_allocated() - base
    finally:
        engine.destroy()  # its gradient hooks would keep it, and its GPU memory, alive past this test
    ratios = {n: measured[n] / plan["totals"][n] for n in batches}
    with capsys.disabled():
        gib = lambda b: round(b / 2 ** 30, 2)  # noqa: E731
        print(f"\nmemory, GiB: before the engine {gib(base)}; engine states planned "
              f"{gib(sum(plan['states'].values()))}, allocated {gib(states)}; plan vs peak per dataset",
              {n: (gib(plan["totals"][n]), gib(measured[n])) for n in batches})
    assert all(0.85 <= r <= 1.15 for r in ratios.values()), ratios


def test_cpu_fp16_shim_is_never_active_where_cuda_is():
    from mthl_ds.runtime import cpu_half
    assert cpu_half.enable() is False and cpu_half._mode is None

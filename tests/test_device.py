"""One device discipline, checked without a GPU.

torch's ``FakeTensorMode`` makes tensors on device ``cuda`` with no GPU (this machine's torch is a CUDA build): an op
that mixes devices raises ``FakeTensorDeviceMismatchError``, and an op whose output shape or a Python value depends
on a tensor's contents (``nonzero``, boolean-mask indexing, ``.item()``, ``.tolist()``, ``bool(t)``) raises too. On
a real GPU each of those is a device mismatch or a device-to-host sync. So a training step that runs here under
fake CUDA (model, heads, losses, routing statistics, LAMB on whole tensors and on a ZeRO partition, ZeRO's
gradient norm and overflow check) places everything on the device and waits for nothing. Backward needs a real
device (autograd asks for a CUDA context): that part is the CUDA tests' (tests/test_cuda.py).
"""
import ast
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from mthl_ds.build import build_model
from mthl_ds.config import load_recipe
from mthl_ds.moe import grouped
from mthl_ds.runtime.device import to_device
from mthl_ds.runtime.engine import global_grad_norm, has_nonfinite, optimizer_groups
from mthl_ds.runtime.optim import Lamb, PartitionLayout
from mthl_ds.studies.memory import cast_parameters
from mthl_ds.tasks import fake_batch

PACKAGE = Path(__file__).resolve().parent.parent / "mthl_ds"
COLLECTIVES = {"all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "broadcast",
               "broadcast_object_list", "reduce", "reduce_scatter", "reduce_scatter_tensor", "all_to_all",
               "all_to_all_single", "barrier", "gather", "gather_object", "scatter", "scatter_object_list", "send",
               "recv", "isend", "irecv", "monitored_barrier"}


def collective_calls(path: Path) -> list[str]:
    """``file:line owner.name`` of every call ``torch.distributed.<collective>(...)``, ``dist.<collective>(...)`` or
    ``deepspeed.comm.<collective>(...)`` in a Python file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in COLLECTIVES:
            owner = ast.unparse(node.func.value)
            if owner in ("torch.distributed", "dist", "deepspeed.comm"):
                found.append(f"{path.name}:{node.lineno} {owner}.{node.func.attr}")
    return sorted(found, key=lambda c: int(c.split(":")[1].split()[0]))


def test_collectives_are_called_in_one_module():
    calls = {str(p.relative_to(PACKAGE.parent)): collective_calls(p) for p in sorted(PACKAGE.rglob("*.py"))}
    assert calls["mthl_ds/runtime/collectives.py"], \
        "the scan finds nothing: it no longer sees the collectives module's calls"
    outside = [f"{name}: {c}" for name, found in calls.items(
    ) if name != "mthl_ds/runtime/collectives.py" for c in found]
    assert not outside, f"torch.distributed collectives outside mthl_ds/runtime/collectives.py: {outside}"


def test_the_scan_finds_collectives_however_torch_distributed_is_named(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import torch\nimport torch.distributed as dist\n"
                     "def f(t):\n    dist.all_reduce(t)\n    torch.distributed.barrier()\n    t.all_reduce()\n")
    assert collective_calls(probe) == ["probe.py:4 dist.all_reduce", "probe.py:5 torch.distributed.barrier"]


def fake_step(recipe, name: str, batch_size: int, dtype: torch.dtype = torch.float32) -> dict:
    """Under fake CUDA: the recipe's model in training mode with its parameters in ``dtype`` (as DeepSpeed casts
    them), one batch of ``name`` at its real input size, forward, task loss + router losses, the logged figures,
    the routing-buffer fold and the usage count."""
    model = cast_parameters(build_model(recipe), dtype).train()
    batch = fake_batch(recipe, name, batch_size=batch_size)
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = model.to("cuda")
        device = next(model.parameters()).device
        batch = to_device(batch, device, model.dtype)
        model.set_dataset(name)
        output = model(batch["image"])
        task_loss, parts = model.heads[name].loss(output, batch)
        loss = recipe.datasets[name].loss_weight * task_loss + model.backbone.router_loss()
        applied = torch.isfinite(loss).all()
        model.backbone.update_routing_buffers(None, applied)
        usage = torch.zeros(len(model.backbone.moe_layers), recipe.model.moe.num_experts, device=device)
        for layer, row in zip(model.backbone.moe_layers, usage):
            row += layer.gate.counts.float() * applied
        logged = [loss, *parts.values(), *model.backbone.router_loss_terms().values(), model.backbone.routing_mi(),
                  model.backbone.routes_dropped()]
        return {"loss": loss, "logged": logged, "usage": usage,
                "joint": [g.routing_joint for g in model.backbone.gates]}


@pytest.mark.parametrize("recipe_name, batches", [
    ("demo", {}),
    ("mthl_swin_t", {"imagenet": 64, "coco": 2, "ade20k": 2}),  # the paper's per-GPU batches
])
def test_training_forward_and_losses_stay_on_the_device_without_syncs(recipe_name, batches):
    recipe = load_recipe(recipe_name)
    for name, d in recipe.datasets.items():
        out = fake_step(recipe, name, batches.get(name, d.batch_size))
        tensors = [out["loss"], *out["logged"], out["usage"], *out["joint"]]
        assert all(t.device.type == "cuda" for t in tensors), name
        assert out["loss"].shape == () and out["usage"].shape[1] == recipe.model.moe.num_experts


@pytest.mark.parametrize("recipe_name, batches", [
    ("demo", {}),
    ("mthl_swin_t", {"imagenet": 64, "coco": 2, "ade20k": 2}),
])
def test_dropless_forward_on_grouped_kernels_stays_on_the_device_without_syncs(monkeypatch, recipe_name, batches):
    """``model.moe.dispatch: dropless`` in bf16 on a GPU where ``torch._grouped_mm`` runs (sm90): every expert's rows
    in one kernel per linear layer, and no count read on the host. The backend's probe needs a real device, so the
    choice it makes there is set here. (The looped backend, fp16 on V100s, reads each layer's counts by design.)"""
    monkeypatch.setitem(grouped.CHOICES, ("cuda:0", torch.bfloat16), "grouped_mm")
    recipe = load_recipe(recipe_name, ["model.moe.dispatch=dropless"])
    for name, d in recipe.datasets.items():
        out = fake_step(recipe, name, batches.get(name, d.batch_size), torch.bfloat16)
        tensors = [out["loss"], *out["logged"], out["usage"], *out["joint"]]
        assert all(t.device.type == "cuda" for t in tensors), name
        assert out["loss"].shape == () and out["usage"].shape[1] == recipe.model.moe.num_experts


def fake_grads(params: list[torch.Tensor]) -> None:
    for i, p in enumerate(params):
        p.grad = torch.randn_like(p) * (0 if i % 5 == 0 else 1e-3)  # every fifth tensor idle


@pytest.mark.parametrize("recipe_name", ["demo", "mthl_swin_t"])
def test_lamb_step_stays_on_the_device_without_syncs(recipe_name):
    """Whole tensors (ZeRO 0) and one flat ZeRO partition holding every tensor, with a device-side step mask and
    (partition) clipping by a device-side global norm."""
    model = build_model(load_recipe(recipe_name))
    sizes = [p.numel() for p in model.parameters()]
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = model.to("cuda")
        groups = optimizer_groups(model, 0.05)
        whole = Lamb(groups, lr=1e-3)
        fake_grads([p for g in groups for p in g["params"]])
        whole.apply_mask = torch.ones((), dtype=torch.bool, device="cuda")
        whole.step()
        whole.step()  # the second step reads the moments and the step count the first left on the device
        flat = torch.nn.Parameter(torch.cat([p.detach().flatten() for p in model.parameters()]))
        flat.grad = torch.randn_like(flat)
        partitioned = Lamb([flat], lr=1e-3, weight_decay=0.05)
        partitioned.layouts[flat] = PartitionLayout(sizes, torch.arange(len(sizes)), len(sizes))
        partitioned.apply_mask = torch.ones((), dtype=torch.bool, device="cuda")
        partitioned.grad_norm, partitioned.max_grad_norm = (lambda: flat.grad.norm()), 0.1
        partitioned.step()
        partitioned.step()
        states = [v for s in list(whole.state.values()) + list(partitioned.state.values()) for v in s.values()]
        counts = [g["step"] for g in whole.param_groups + partitioned.param_groups]
    assert states and all(t.device.type == "cuda" for t in states + counts)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_zero_gradient_norm_and_overflow_check_stay_on_the_device_without_syncs(dtype):
    """The global norm and overflow check build_engine gives ZeRO 1/2 (runtime/engine.py), over mthl_swin_t's
    gradients as half-precision fragments of two parameter groups, with one of ZeRO's padding fragments."""
    sizes = [p.numel() for p in build_model(load_recipe("mthl_swin_t")).parameters()]
    with FakeTensorMode(allow_non_fake_inputs=True):
        fragments = list(torch.randn(sum(sizes) + 8, device="cuda", dtype=dtype).split(sizes + [8]))
        fragments[-1]._zero_padding = True
        groups = [fragments[:100], fragments[100:]]
        norm, flag = global_grad_norm(groups), has_nonfinite(groups)
    assert norm.device.type == "cuda" and norm.dtype == torch.float32 and norm.shape == ()
    assert flag.device.type == "cuda" and flag.dtype == torch.bool and flag.shape == (1,)


def test_lamb_masked_step_leaves_everything_as_it_was():
    """A step masked on the device (a non-finite loss on some rank) with non-finite gradients leaves weights,
    moments and the step count as they were, on whole tensors and on a partition."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
    flat = torch.nn.Parameter(torch.randn(15))
    whole, partitioned = Lamb(params, lr=0.01, weight_decay=0.05), Lamb([flat], lr=0.01, weight_decay=0.05)
    partitioned.layouts[flat] = PartitionLayout([12, 3], torch.arange(2), 2)
    for optimizer, tensors in ((whole, params), (partitioned, [flat])):
        for t in tensors:
            t.grad = torch.randn_like(t)
        optimizer.step()
        moments = lambda: [v.clone() for s in optimizer.state.values() for v in s.values()]  # noqa: E731
        before = [t.detach().clone() for t in tensors], moments()
        count = optimizer.param_groups[0]["step"].clone()
        for t in tensors:
            t.grad = torch.full_like(t, float("nan"))
        optimizer.apply_mask = torch.tensor(False)
        optimizer.step()
        assert all(torch.equal(a, b) for a, b in zip(tensors, before[0]))
        assert all(torch.equal(a, b) for a, b in zip(moments(), before[1])) and len(before[1]) == 2 * len(tensors)
        assert torch.equal(optimizer.param_groups[0]["step"], count)
        optimizer.apply_mask = torch.tensor(True)
        for t in tensors:
            t.grad = torch.randn_like(t)
        optimizer.step()
        assert not torch.equal(tensors[0], before[0][0]) and optimizer.param_groups[0]["step"] == count + 1

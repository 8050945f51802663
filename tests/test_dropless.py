"""Dropless dispatch (``model.moe.dispatch: dropless``): the same outputs and gradients as the capacity path when
the capacity path drops nothing, in one process and on 2 gloo ranks with ep_size 1 and 2, on both grouped-expert
backends; the same parameters and checkpoint files."""
import pytest
import torch
import torch.nn.functional as F
from conftest import run_ranks
from timm.layers import Mlp
from workers.moe_ranks import EP_OVERRIDES, global_batch, per_expert

from mthl_ds.build import build_model
from mthl_ds.config import load_recipe
from mthl_ds.models.counting import count_flops
from mthl_ds.moe.experts import KEYS, StackedMlps
from mthl_ds.moe.grouped import (LoopedExperts, backend, capacity_backend, combine, grouped_mm_works, padded_count,
                                 run_and_combine, run_groups)

ONE_PROCESS = [o for o in EP_OVERRIDES if not o.startswith("train.ep_size")]  # drop_tokens=false: nothing dropped


def step(model, images, labels):
    model.set_dataset("imagenet")
    logits = model(images)
    F.cross_entropy(logits, labels).backward()
    return logits.detach(), per_expert((n, p.grad) for n, p in model.named_parameters() if p.grad is not None)


def test_dropless_equals_the_capacity_path_that_drops_nothing_in_one_process():
    """Every MoE layer of the demo model, training mode, one forward and backward: logits and every gradient
    (experts, routers, the rest) agree; the parameter names (so the checkpoint files) are the same."""
    capacity = build_model(load_recipe("demo", ONE_PROCESS)).train()
    dropless = build_model(load_recipe("demo", [*ONE_PROCESS, "model.moe.dispatch=dropless"])).train()
    assert [n for n, _ in capacity.named_parameters()] == [n for n, _ in dropless.named_parameters()]
    dropless.load_state_dict(capacity.state_dict())
    images, labels = global_batch()
    want, want_grads = step(capacity, images, labels)
    got, got_grads = step(dropless, images, labels)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert set(got_grads) == set(want_grads) and any(".deepspeed_experts." in n for n in got_grads)  # per expert
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_the_capacity_path_drops_routes_that_dropless_keeps():
    """With the paper's drop_tokens and capacity factor 1 the capacity path drops routes of a skewed batch (its
    output differs); dropless keeps them all (its layer's gate is built without dropping)."""
    recipe = [o for o in ONE_PROCESS if "drop_tokens" not in o]
    capacity = build_model(load_recipe("demo", recipe)).train()
    dropless = build_model(load_recipe("demo", [*recipe, "model.moe.dispatch=dropless"])).train()
    dropless.load_state_dict(capacity.state_dict())
    assert all(not layer.gate.drop_tokens for layer in dropless.backbone.moe_layers)
    images, labels = global_batch()
    reference = build_model(load_recipe("demo", ONE_PROCESS)).train()
    reference.load_state_dict(capacity.state_dict())
    kept, _ = step(reference, images, labels)
    torch.testing.assert_close(step(dropless, images, labels)[0], kept, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(step(capacity, images, labels)[0], kept, atol=1e-4)


def mlps(count=3, dim=16, hidden=32, act_layer=torch.nn.GELU, dtype=torch.float32, device="cpu"):
    """``count`` experts ``dim -> hidden -> dim``, initialised as timm's ``Mlp`` is, stacked."""
    torch.manual_seed(0)
    timm_mlps = [Mlp(dim, hidden, act_layer=act_layer) for _ in range(count)]
    experts = StackedMlps(dim, hidden, count, act_layer, "test")
    experts.set_experts([torch.stack([m.get_parameter(key) for m in timm_mlps]) for key in KEYS])
    return experts.to(device, dtype)


def expert_mlp(experts, e, x):
    """Expert ``e`` of ``experts`` on the rows ``x``, alone."""
    return experts.run(experts.expert(e), x)


def grads(experts) -> list[torch.Tensor]:
    """The gradients of the four stacked tensors (one bank)."""
    return [p.grad for p in experts.banks[0].tensors()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bf16 on the CPU: rows padded
@pytest.mark.parametrize("counts", [[5, 0, 7], [0, 0, 12], [4, 4, 4]])
def test_looped_experts_run_each_expert_on_its_rows_and_give_empty_ones_zero_gradients(counts, dtype):
    experts = mlps(dtype=dtype)
    x = torch.randn(sum(counts), 16, dtype=dtype, requires_grad=True)
    out = run_groups(experts, x, torch.tensor(counts), "looped")
    assert out.shape == x.shape
    starts = [sum(counts[:e]) for e in range(3)]
    with torch.no_grad():
        for e, (start, count) in enumerate(zip(starts, counts)):
            torch.testing.assert_close(out[start:start + count], expert_mlp(experts, e, x[start:start + count]))
    out.sum().backward()
    fc1_weight = grads(experts)[0]
    for e, count in enumerate(counts):
        assert bool(fc1_weight[e].any()) == (count > 0)


def test_capacity_experts_loop_on_one_cpu_rank_only():
    """The capacity path's experts in training: looped on the CPU with one expert-parallel rank (faster there),
    batched (``bmm``) on a GPU and when an all-to-all exchanges the slots."""
    assert capacity_backend(torch.device("cpu"), 1) == "looped"
    assert capacity_backend(torch.device("cpu"), 2) == "batched"
    assert capacity_backend(torch.device("cuda", 0), 1) == "batched"


def test_padded_count_gives_few_sizes_near_the_rows_on_the_cpu_in_half_precision_only():
    """On the CPU in bf16 / fp16: at least the rows, a multiple of 16, at most 1/8 more from 128 rows on, and at
    most 8 sizes per octave (oneDNN's kernels are built per shape); 0 stays 0. fp32, and CUDA, run the rows."""
    cpu = torch.device("cpu")
    sizes = [padded_count(n, cpu, torch.bfloat16) for n in range(1, 20000)]
    for n, size in zip(range(1, 20000), sizes):
        assert n <= size and size % 16 == 0 and (n < 128 or size <= n * 9 / 8), (n, size)
    for low in (128, 1024, 8192):
        assert len({s for n, s in enumerate(sizes, 1) if low < n <= 2 * low}) == 8
    assert padded_count(0, cpu, torch.float16) == 0 and padded_count(300, cpu, torch.float16) == 320
    assert padded_count(300, cpu, torch.float32) == 300
    assert padded_count(300, torch.device("cuda"), torch.bfloat16) == 300


def routed(count=3, dim=6, hidden=5, tokens=5, dtype=torch.float64, act_layer=torch.nn.GELU, device="cpu"):
    """Experts, tokens and rows in expert order as the layer makes them: counts [4, 0, 5] (an empty expert), token
    0 routed to experts 0 and 2 (so its output sums two gated rows), token 3 to expert 0 only."""
    experts = mlps(count, dim, hidden, act_layer, dtype, device)
    counts = [4, 0, 5]
    x = torch.randn(tokens, dim, dtype=dtype).to(device).requires_grad_()
    source = torch.tensor([0, 1, 2, 3, 0, 1, 2, 4, 4], device=device)
    gate_dtype = torch.promote_types(dtype, torch.float32)  # the gate's values are float32 (float64 for gradcheck)
    gates = torch.rand(len(source), dtype=gate_dtype).to(device).requires_grad_()
    return experts, x, source, gates, counts


@pytest.mark.parametrize("act_layer", [torch.nn.GELU, torch.nn.SiLU])
def test_looped_experts_gradients_are_the_derivatives_of_their_outputs(act_layer):
    """torch's gradcheck in float64 (finite differences against the hand-written backward) for the tokens, the
    gates and every expert's weights and biases; GELU uses its own kernel, any other activation autograd."""
    experts, x, source, gates, counts = routed(act_layer=act_layer)
    assert torch.autograd.gradcheck(lambda t, g, *ps: LoopedExperts.apply(t, source, g, counts, experts.act, True, *ps),
                                    (x, gates, *experts.stacks()))


CUDA = pytest.mark.cuda  # skipped, with the reason, where CUDA is not available (conftest.py)


@pytest.mark.parametrize("device, dtype", [("cpu", torch.float32), ("cpu", torch.bfloat16),
                                           pytest.param("cuda", torch.float32, marks=CUDA),
                                           pytest.param("cuda", torch.float16, marks=CUDA),
                                           pytest.param("cuda", torch.bfloat16, marks=CUDA)])
def test_looped_experts_equal_gather_experts_then_combine(device, dtype):
    """The fused looped experts against the same experts as separate ops (gather the rows, :func:`run_groups`,
    :func:`combine`): outputs and gradients of tokens, gates and weights agree, to half precision's rounding in
    fp16 and bf16 (each fused step rounds the same values in another order). CUDA runs it where fp16 (V100s)
    or a GPU without grouped kernels has no ``grouped_mm``."""
    experts, x, source, gates, counts = routed(dtype=dtype, device=device)
    results = []
    for fused in (True, False):
        experts.zero_grad()
        inputs, gate_values = x.detach().clone().requires_grad_(), gates.detach().clone().requires_grad_()
        if fused:
            out = run_and_combine(experts, inputs, source, gate_values, torch.tensor(counts, device=device), "looped")
        else:
            rows = run_groups(experts, inputs.index_select(0, source), torch.tensor(counts, device=device), "looped")
            out = combine(rows, source, gate_values, inputs.shape)
        out.float().square().sum().backward()
        results.append([out, inputs.grad, gate_values.grad] + grads(experts))
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    for got, want in zip(*results):
        torch.testing.assert_close(got.float(), want.float(), **tolerance)
    assert not any(g[1].any() for g in results[0][3:])  # the empty expert: zero gradients, as in the capacity path


def test_looped_experts_with_frozen_experts_give_only_input_and_gate_gradients():
    """Router-only adaptation freezes the experts: no weight gradient is made, the tokens' and gates' still are."""
    experts, x, source, gates, counts = routed()
    experts.requires_grad_(False)
    run_and_combine(experts, x, source, gates, torch.tensor(counts), "looped").sum().backward()
    assert x.grad is not None and gates.grad is not None and x.grad.any() and gates.grad.any()
    assert all(g is None for g in grads(experts))


def grouped_and_looped(experts, x, counts) -> dict[str, list[torch.Tensor]]:
    """Per backend, one forward and backward of ``experts`` on the rows ``x`` grouped by ``counts``: the output,
    the input's gradient, each expert's fc1 weight gradient and each expert's fc2 bias gradient, in float32."""
    results = {}
    for choice in ("grouped_mm", "looped"):
        experts.zero_grad()
        inputs = x.clone().requires_grad_()
        out = run_groups(experts, inputs, counts, choice)
        out.float().square().sum().backward()
        fc1_weight, _, _, fc2_bias = grads(experts)
        tensors = [out, inputs.grad, *fc1_weight.unbind(0), *fc2_bias.unbind(0)]
        results[choice] = [t.float() for t in tensors]
    return results


def assert_backends_agree(results, counts) -> None:
    """Outputs within 2e-2, gradients within 3e-2 (bf16's rounding, accumulated over the rows)."""
    (out, *grads), (want, *want_grads) = results["grouped_mm"], results["looped"]
    torch.testing.assert_close(out, want, rtol=2e-2, atol=2e-2)
    for got, expected in zip(grads, want_grads):
        torch.testing.assert_close(got, expected, rtol=3e-2, atol=3e-2)
    empty = counts.tolist().index(0)
    assert not grads[1 + empty].any()  # the empty expert's fc1 weight: a zero gradient


@pytest.mark.skipif(not grouped_mm_works(torch.device("cpu"), torch.bfloat16),
                    reason="torch._grouped_mm does not run in bf16 on this machine's CPU with this torch")
def test_grouped_mm_experts_agree_with_looped_ones_in_bf16():
    """``torch._grouped_mm`` (what CUDA sm90 runs) against the looped experts on the same bf16 rows: outputs and
    input and weight gradients within bf16's rounding; FLOPs counted alike."""
    experts = mlps(dtype=torch.bfloat16)
    counts = torch.tensor([5, 0, 11])
    x = torch.randn(16, 16, dtype=torch.bfloat16)
    assert_backends_agree(grouped_and_looped(experts, x, counts), counts)
    assert backend(torch.device("cpu"), torch.bfloat16) == "looped"  # the CPU's kernel is slower than the loop

    def forward_backward(choice):
        inputs = x.clone().requires_grad_()
        run_groups(experts, inputs, counts, choice).float().square().sum().backward()

    # torch's FLOP counter counts the grouped kernel (here) as matmuls over the 16 rows (d 16, hidden 32); the
    # CPU's bf16 loop runs each expert's rows padded to 16 (5 + 0 + 11 -> 16 + 0 + 16)
    flops = {choice: count_flops(lambda: forward_backward(choice)) for choice in ("grouped_mm", "looped")}
    assert flops["grouped_mm"] == 3 * 2 * 16 * (16 * 32 + 32 * 16)
    assert flops["looped"] == 3 * 2 * 32 * (16 * 32 + 32 * 16)


@CUDA
def test_dropless_experts_on_cuda_use_grouped_mm_where_it_runs_and_match_the_loop():
    """bf16 on CUDA: the backend is ``grouped_mm`` wherever its probe runs (sm90), and its outputs, input gradients
    and weight gradients match the looped experts' on the same rows within bf16's rounding, with group sizes that
    are not multiples of 8 and an empty expert."""
    device = torch.device("cuda")
    expected = "grouped_mm" if grouped_mm_works(device, torch.bfloat16) else "looped"
    assert backend(device, torch.bfloat16) == expected
    if expected == "looped":
        pytest.skip(f"torch._grouped_mm does not run in bf16 on {torch.cuda.get_device_name()} with torch "
                    f"{torch.__version__}: the looped backend is the one chosen, as asserted")
    experts = mlps(dim=64, hidden=128, dtype=torch.bfloat16, device=device)
    x = torch.randn(128, 64, device=device, dtype=torch.bfloat16)
    counts = torch.tensor([37, 0, 91], device=device)
    assert_backends_agree(grouped_and_looped(experts, x, counts), counts)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dropless_ranks")
    run_ranks("moe_ranks.py", 2, [str(out), "dropless"])
    return [torch.load(out / f"rank{r}.pt") for r in (0, 1)]


@pytest.mark.parametrize("ep_size", [1, 2])
def test_dropless_on_two_ranks_equals_one_process(ranks, ep_size):
    """Real DeepSpeed engines on 2 gloo ranks, each with half the batch: with ep_size 2 the rows cross ranks in
    a variable-size all-to-all, with ep_size 1 each rank runs every expert; either way the logits and every
    gradient (summed over the ranks' halves) are those of the capacity path in one process."""
    model = build_model(load_recipe("demo", ONE_PROCESS)).train()
    images, labels = global_batch()
    logits, grads = step(model, images, labels)
    results = [r[f"dropless_ep{ep_size}"] for r in ranks]
    torch.testing.assert_close(torch.cat([r["logits"] for r in results]), logits, rtol=1e-5, atol=1e-5)
    got = {}
    for result in results:  # expert gradients live on their rank; the others are all-reduced by the engine
        got.update(result["grads"])
    for name, grad in grads.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")

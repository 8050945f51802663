"""LAMB that stays LAMB under ZeRO 1 and 2: per-tensor trust ratios from partition fragments."""
import pytest
import timm.optim
import torch
from conftest import run_ranks
from workers.lamb_ranks import overrides, train, weights

from mthl_ds.build import build_model
from mthl_ds.config import load_recipe
from mthl_ds.runtime.engine import build_engine, init_distributed
from mthl_ds.runtime.optim import Lamb

TOLERANCE = 1e-5


def max_relative_difference(a: dict, b: dict, keys) -> float:
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp(min=1e-12)) for k in keys)


def merged(ranks, run):
    """The whole model from the two ranks: shared tensors from rank 0, each expert from the rank holding it."""
    return {**ranks[1][run], **ranks[0][run]}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("lamb")
    run_ranks("lamb_ranks.py", 2, [str(out)])
    return [torch.load(out / f"rank{r}.pt") for r in (0, 1)]


def test_matches_timm_lamb_on_whole_tensors():
    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    ours, ref = model(), model()
    groups = lambda m: [{"params": [p for p in m.parameters() if p.ndim > 1], "weight_decay": 0.05},  # noqa: E731
                        {"params": [p for p in m.parameters() if p.ndim == 1], "weight_decay": 0.0}]
    optimizers = [Lamb(groups(ours), lr=0.01), timm.optim.Lamb(groups(ref), lr=0.01, max_grad_norm=None)]
    for _ in range(5):
        x = torch.randn(32, 8)
        for m, o in zip((ours, ref), optimizers):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    for a, b in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_idle_tensors_are_skipped_as_timm_skips_a_tensor_without_gradient():
    """A tensor with an all-zero gradient (another dataset's head) keeps its weights and moments, as timm's LAMB
    keeps a tensor whose gradient is None under DDP; the others move exactly as timm moves them."""
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(4, 4)) for _ in range(3)]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt, timm_opt = Lamb(ours, lr=0.01, weight_decay=0.05), timm.optim.Lamb(ref, lr=0.01, weight_decay=0.05,
                                                                          max_grad_norm=None)
    for step in range(4):
        grads = [torch.randn(4, 4) for _ in range(3)]
        idle = step % 3
        for i, (a, b, g) in enumerate(zip(ours, ref, grads)):
            a.grad = torch.zeros(4, 4) if i == idle else g.clone()
            b.grad = None if i == idle else g.clone()
        before = ours[idle].detach().clone(), {k: v.clone() for k, v in opt.state[ours[idle]].items()}
        opt.step()
        timm_opt.step()
        assert torch.equal(ours[idle], before[0])
        assert all(torch.equal(opt.state[ours[idle]][k], v) for k, v in before[1].items())
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_a_stacked_tensor_steps_as_its_slices_would_as_tensors_of_their_own():
    """A parameter with ``segments`` (a MoE layer's experts stacked) gets a trust ratio and an idle check per
    slice: the same steps as three separate tensors, and a slice whose gradient is zero (an expert no token
    reached) keeps its weights and moments. Without ``segments`` the trust ratio would be one for the stack."""
    torch.manual_seed(0)
    stacked = torch.nn.Parameter(torch.randn(3, 4, 5) * torch.tensor([0.1, 1.0, 10.0]).view(3, 1, 1))
    stacked.segments = 3
    separate = [torch.nn.Parameter(t.detach().clone()) for t in stacked.unbind(0)]
    whole = torch.nn.Parameter(stacked.detach().clone())  # the control, one tensor
    optimizers = [Lamb([p], lr=0.01, weight_decay=0.05) for p in (stacked, whole)] + [
        Lamb(separate, lr=0.01, weight_decay=0.05)]
    for step in range(4):
        idle = step % 3
        grads = torch.randn(3, 4, 5)
        grads[idle] = 0
        weights = stacked[idle].detach().clone()
        moments = optimizers[0].state[stacked]["exp_avg"][idle].clone() if step else None
        stacked.grad, whole.grad = grads.clone(), grads.clone()
        for p, g in zip(separate, grads):
            p.grad = g.clone()
        for o in optimizers:
            o.step()
        assert torch.equal(stacked[idle], weights)
        if moments is not None:
            assert torch.equal(optimizers[0].state[stacked]["exp_avg"][idle], moments)
        torch.testing.assert_close(stacked.detach(), torch.stack([p.detach() for p in separate]), rtol=1e-6,
                                   atol=1e-7)
    assert (whole - stacked).abs().max() > 1e-3


@pytest.mark.parametrize("run", ["zero1", "zero2"])
def test_zero_partitions_give_stage0_lamb(ranks, run):
    for rank in ranks:
        keys = list(rank["stage0"])
        dense = [k for k in keys if "deepspeed_experts" not in k]
        experts = [k for k in keys if "deepspeed_experts" in k]
        assert dense and experts
        assert max_relative_difference(rank[run], rank["stage0"], dense) <= TOLERANCE
        assert max_relative_difference(rank[run], rank["stage0"], experts) <= TOLERANCE


def test_two_rank_zero2_equals_one_rank_stage0(ranks):
    init_distributed()
    recipe = load_recipe("demo", overrides("stage0_fp32.json", 1))
    engine, _, _ = build_engine(build_model(recipe), recipe)
    train(engine, 0, 1)
    single = weights(engine, 1)
    two = merged(ranks, "zero2")
    assert set(single) == set(two)
    assert max_relative_difference(two, single, list(single)) <= TOLERANCE


def test_per_partition_lamb_is_a_different_optimizer(ranks):
    """The control: DeepSpeed's ZeRO 2 with an ordinary LAMB (one trust ratio per partition)."""
    differences = [max_relative_difference(r["zero2_timm"], r["stage0_timm"], list(r["stage0_timm"])) for r in ranks]
    assert min(differences) > 100 * TOLERANCE, differences
    ours = max(max_relative_difference(r["zero2"], r["stage0"], list(r["stage0"])) for r in ranks)
    print(f"per-partition LAMB (ZeRO 2) vs stage 0: max relative difference {max(differences):.3g}; ours: {ours:.3g}")


@pytest.mark.parametrize("cfg", ["zero1_fp32.json", "zero2_fp32.json"])
def test_zero_global_norm_and_overflow_check_are_deepspeeds(ranks, cfg):
    """build_engine's multi-tensor ZeRO norm and overflow check give what DeepSpeed's per-tensor code gives on the
    same gradients (2 ranks, ep_size 2: expert and shared groups); a NaN planted on one rank makes both infinite
    on every rank, and the overflow flag True on that rank. Ours dispatches a few ops per group, DeepSpeed's a few
    per tensor."""
    for rank, r in enumerate(ranks):
        n = r["norms"][cfg]
        assert n["ops_ours"] <= 5 * n["groups"] + 10 < 2 * n["tensors"] <= n["ops_deepspeed"], n
        for ours, theirs in zip(n["ours"][:2], n["deepspeed"][:2]):
            assert torch.isfinite(ours) and float(ours) > 0
            torch.testing.assert_close(ours, theirs.to(ours.dtype), rtol=1e-5, atol=0)
        assert float(n["ours"][2]) == float(n["deepspeed"][2]) == float("inf")
        assert [bool(f) for f in n["overflow_ours"]] == [bool(f) for f in n["overflow_deepspeed"]] \
            == [False, False, rank == 1]
        assert n["overflow_ours"][0].shape == n["overflow_deepspeed"][0].shape == (1,)


def test_lamb_benchmark_smoke():
    from mthl_ds.studies.bench.lamb import run
    rows = run(repeats=1)
    assert [r["candidate"].split(",")[0] for r in rows] == ["mthl_ds Lamb", "mthl_ds Lamb", "timm Lamb (foreach)"]
    assert all(r["median_ms"] > 0 for r in rows)

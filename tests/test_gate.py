"""The per-dataset gate against an independent float64 reference of Eq. 2 with DeepSpeed's capacity rule."""
import math

import pytest
import torch

from mthl_ds.moe.gate import PerDatasetGate, RoutingContext
from mthl_ds.moe.layer import MoEMlp


def reference_routing(x, weight, k, capacity_factor, min_capacity, renormalize):
    """Dense (S, E) kept-mask, slot locations (each expert's kept routes in order of probability, as the gate
    fills them) and gate values, computed in float64 with plain loops."""
    probs = torch.softmax(x.double() @ weight.double().t(), dim=1)
    s_count, e_count = probs.shape
    routed = torch.zeros(s_count, e_count, dtype=torch.bool)
    for s in range(s_count):
        routed[s, probs[s].topk(k).indices] = True
    capacity = max(math.ceil(k * capacity_factor * s_count / e_count), min_capacity)
    kept = torch.zeros_like(routed)
    locations = torch.full((s_count, e_count), -1, dtype=torch.long)
    for e in range(e_count):
        tokens = [s for s in range(s_count) if routed[s, e]]
        for location, s in enumerate(sorted(tokens, key=lambda t: -probs[t, e].item())[:capacity]):
            kept[s, e] = True
            locations[s, e] = location
    gates = probs * kept
    if renormalize:
        gates = gates / gates.sum(1, keepdim=True).clamp(min=torch.finfo(torch.float32).eps)
    return kept, locations, gates, capacity, probs


def dense_from_routes(indices, locations, gates, num_experts):
    s_count = indices.shape[1]
    kept = torch.zeros(s_count, num_experts, dtype=torch.bool)
    loc = torch.full((s_count, num_experts), -1, dtype=torch.long)
    val = torch.zeros(s_count, num_experts, dtype=torch.float64)
    for r in range(indices.shape[0]):
        for s in range(s_count):
            e = int(indices[r, s])
            if e >= 0:
                kept[s, e] = True
                loc[s, e] = int(locations[r, s])
                val[s, e] = float(gates[r, s].detach())
    return kept, loc, val


def make_gate(k=3, num_experts=8, dim=16, **kw):
    ctx = RoutingContext()
    gate = PerDatasetGate(dim, num_experts, ["a", "b"], {"a": k, "b": k}, context=ctx, **kw)
    ctx.dataset = "a"
    return gate


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 4.0])
def test_routes_match_reference(renormalize, capacity_factor):
    torch.manual_seed(0)
    gate = make_gate(capacity_factor=capacity_factor, renormalize=renormalize, min_capacity=2)
    x = torch.randn(40, 16)
    l_aux, capacity, num_experts, indices, locations, gates, counts = gate(x)
    kept, loc, val, ref_capacity, probs = reference_routing(x, gate.routers["a"].proj.weight, 3, capacity_factor, 2,
                                                            renormalize)
    assert int(capacity) == ref_capacity and num_experts == 8
    got_kept, got_loc, got_val = dense_from_routes(indices, locations, gates, 8)
    assert torch.equal(got_kept, kept)
    assert torch.equal(got_loc[kept], loc[kept])
    torch.testing.assert_close(got_val, val, rtol=1e-5, atol=1e-6)
    if capacity_factor < 1:
        assert (~kept & (probs >= probs.topk(3, dim=1).values[:, -1:])).any(), "small capacity must drop routes"
    assert counts.tolist() == (probs >= probs.topk(3, dim=1).values[:, -1:]).sum(0).tolist()


@pytest.mark.parametrize("renormalize", [False, True])
def test_layer_output_matches_reference(renormalize):
    torch.manual_seed(1)
    gate = make_gate(k=2, num_experts=6, dim=12, capacity_factor=1.0, renormalize=renormalize)
    layer = MoEMlp(12, 8, 6, gate)
    layer.init_weights(seed=3)
    x = torch.randn(3, 10, 12)
    y = layer(x)
    kept, _, gates, _, _ = reference_routing(x.reshape(-1, 12), gate.routers["a"].proj.weight, 2, 1.0, 4, renormalize)
    expected = torch.zeros(30, 12, dtype=torch.float64)
    flat = x.reshape(-1, 12).double()
    for e in range(6):
        w1, b1, w2, b2 = (t.double() for t in layer.mlps.expert(e))
        out = torch.nn.functional.gelu(flat @ w1.t() + b1) @ w2.t() + b2
        expected += gates[:, e:e + 1] * out
    assert y.shape == x.shape
    torch.testing.assert_close(y.double(), expected.reshape(3, 10, 12), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("experts", ["looped", "batched"])
@pytest.mark.parametrize("capacity_factor", [0.5, 1.0])
def test_layer_forward_equals_deepspeed_moe_layer(capacity_factor, experts):
    """Our dispatch / experts / combine against DeepSpeed's own MOELayer forward on the same gate routes:
    outputs and every gradient (input, experts, router), with routes dropped over capacity, a pruned logit and a
    frozen expert (in a bank of its own); the experts both ways (``grouped.capacity_backend``: looped on one CPU
    rank, else batched)."""
    torch.manual_seed(4)
    gate = make_gate(k=2, num_experts=6, dim=12, capacity_factor=capacity_factor, loss_coefs={"mi": 1.0})
    layer = MoEMlp(12, 8, 6, gate)
    layer.capacity_experts = experts
    layer.init_weights(seed=5)
    layer.keep_experts([0, 1, 2, 4, 5])  # expert 3's logit stays in the softmax, unselectable
    layer.mlps.split([0, 2, 3, 4])  # expert 1 frozen: bank 0
    assert layer.mlps.ids == [[1], [0, 2, 3, 4]] and layer.mlps.trainable() == [True, False, True, True, True]
    x = torch.randn(4, 15, 12)
    weight = torch.linspace(-1, 1, 12)

    def run(forward):
        layer.zero_grad(set_to_none=True)
        inp = x.clone().requires_grad_(True)
        out = forward(inp)
        ((out * weight).sum() + gate.weighted_loss()).backward()
        grads = {n: p.grad for n, p in layer.named_parameters() if p.requires_grad}
        return out.detach(), inp.grad, grads

    ours, stock = run(layer), run(lambda t: layer.deepspeed_moe(t, None))
    slots = 5 * math.ceil(capacity_factor * 2 * 60 / 5)
    assert (gate.counts.sum() > slots) == (capacity_factor == 0.5)  # routes were dropped at 0.5 only
    torch.testing.assert_close(ours[0], stock[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours[1], stock[1], rtol=1e-5, atol=1e-6)
    assert ours[2].keys() == stock[2].keys() and not any(".banks.0." in n for n in ours[2])
    assert any(".banks.1." in n for n in ours[2])
    for name in ours[2]:
        torch.testing.assert_close(ours[2][name], stock[2][name], rtol=1e-5, atol=1e-6, msg=name)
    assert ours[2]["deepspeed_moe.gate.routers.a.proj.weight"].abs().sum() > 0


def test_only_current_router_gets_gradient():
    torch.manual_seed(2)
    gate = make_gate(loss_coefs={"mi": 1.0, "zloss": 1e-3})
    layer = MoEMlp(16, 8, 8, gate)
    y = layer(torch.randn(20, 16))
    (y.square().sum() + gate.weighted_loss()).backward()
    assert gate.routers["a"].proj.weight.grad is not None and gate.routers["a"].proj.weight.grad.abs().sum() > 0
    assert gate.routers["b"].proj.weight.grad is None


def test_a_router_whose_logits_select_other_experts_routes_to_them():
    """A router's ``choices`` name the expert of each logit: routes, counts and usage follow them. The gate skips
    re-indexing only while logit i selects expert i for every expert (``Router.in_order``), set again when a
    state dict is loaded."""
    torch.manual_seed(6)
    gate = make_gate(k=2, num_experts=6, capacity_factor=0.5, loss_coefs={"mi": 1.0})
    x = torch.randn(30, 16)
    plain = gate(x)
    indices, counts, usage = plain.indices.clone(), plain.counts.clone(), gate.pending_usage[1].clone()
    assert (indices < 0).any() and gate.routers["a"].in_order  # capacity dropped routes
    order = torch.tensor([3, 0, 5, 1, 4, 2])
    gate.routers["a"].set_choices(order)
    gate.context.forward_id += 1
    moved = gate(x)
    assert not gate.routers["a"].in_order
    assert torch.equal(moved.indices, torch.where(indices >= 0, order[indices], -1))
    assert torch.equal(moved.counts[order], counts)
    torch.testing.assert_close(gate.pending_usage[1][order], usage)
    fresh = make_gate(k=2, num_experts=6, capacity_factor=0.5)
    fresh.load_state_dict(gate.state_dict())
    assert not fresh.routers["a"].in_order and fresh.routers["b"].in_order
    assert torch.equal(fresh(x).indices, moved.indices)


def test_per_dataset_top_k():
    ctx = RoutingContext()
    gate = PerDatasetGate(16, 8, ["a", "b"], {"a": 1, "b": 5}, capacity_factor=8.0, context=ctx)
    x = torch.randn(30, 16)
    for name, k in (("a", 1), ("b", 5)):
        ctx.dataset = name
        indices = gate(x)[3]
        assert indices.shape == (k, 30) and (indices >= 0).all()
        assert all(len(set(indices[:, s].tolist())) == k for s in range(30))


def test_mlp_router_and_noise():
    torch.manual_seed(3)
    gate = make_gate(router_hidden=32, noise_std=1.0, loss_coefs={"load": 1.0, "importance": 1.0})
    gate.train()
    a = gate(torch.ones(8, 16))[3]
    b = gate(torch.ones(8, 16))[3]
    assert not torch.equal(a, b), "noisy gating must vary the routes between calls in training"
    gate.eval()
    assert torch.equal(gate(torch.ones(8, 16))[3], gate(torch.ones(8, 16))[3])
    assert set(gate.losses) == {"load", "importance"}


def test_drop_tokens_false_keeps_every_route():
    torch.manual_seed(4)
    gate = make_gate(drop_tokens=False, capacity_factor=0.1)
    indices = gate(torch.randn(50, 16))[3]
    assert (indices >= 0).all()


@pytest.mark.parametrize("drop_tokens", [True, False])
@pytest.mark.parametrize("capacity_factor", [0.5, 1.0])
def test_top_k_routes_equal_deepspeed_topkgating_without_ties(drop_tokens, capacity_factor):
    from deepspeed.moe.sharded_moe import topkgating

    from mthl_ds.moe.gate import top_k_routes
    logits = torch.randn(300, 12, generator=torch.Generator().manual_seed(5))
    ours = top_k_routes(logits, 4, capacity_factor, 4, drop_tokens)
    l_aux, capacity, _, indices, locations, _, counts = topkgating(logits, 4, capacity_factor, 4, drop_tokens,
                                                                   sparse_routes=True)
    assert int(ours[1]) == int(capacity) and torch.equal(ours[4], counts)
    assert torch.equal(ours[2], indices) and torch.equal(ours[3], locations)
    assert torch.equal(ours[0], l_aux)


def test_tied_routes_go_to_the_lower_expert_and_earlier_token_whatever_the_batch():
    """Exact ties (identical tokens with equal logits for several experts, as padding gives): every copy of the
    token takes the lowest experts of the tie, and capacity keeps the earliest copies, in any batch."""
    from mthl_ds.moe.gate import top_k_routes
    tied = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0, 3.0]])
    for seed in range(4):
        others = torch.randn(20, 6, generator=torch.Generator().manual_seed(seed))
        batch = torch.cat([others[:seed * 3], tied.expand(6, 6), others[seed * 3:]])
        _, capacity, indices, locations, _ = top_k_routes(batch, 2, 1.0, 2, True)
        copies = slice(seed * 3, seed * 3 + 6)
        chosen = indices[:, copies]
        routed = chosen[chosen >= 0].tolist()
        assert set(routed) <= {1, 2}, chosen
        for expert in (1, 2):  # the copies a full expert keeps are the earliest ones
            kept = [i for i in range(6) if expert in chosen[:, i].tolist()]
            assert kept == list(range(len(kept))), (expert, chosen)
        no_drop = top_k_routes(batch, 2, 1.0, 2, False)[1]
        assert top_k_routes(batch, 2, 1.0, 2, False)[2][:, copies].tolist() == [[1] * 6, [2] * 6], no_drop

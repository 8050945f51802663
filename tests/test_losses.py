"""Router losses against hand evaluations in float64, and the identity of Eq. 4."""
import math

import torch

from mthl_ds.moe import losses as L
from mthl_ds.moe.gate import PerDatasetGate, RoutingContext, fold_usages


def eq5_by_hand(joint, buffer):
    m, e = len(joint), len(joint[0])
    total = 0.0
    for i in range(m):
        for j in range(e):
            total -= (1 + math.log(buffer[i][j])) * joint[i][j]
    for j in range(e):
        p_e = sum(joint[i][j] for i in range(m))
        b_e = sum(buffer[i][j] for i in range(m))
        total += (1 + math.log(b_e)) * p_e
    return total


def random_joint(m, e, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(m, e, generator=g, dtype=torch.float64).flatten(), 0).reshape(m, e)


def test_mi_surrogate_equals_eq5_by_hand():
    joint = random_joint(3, 12, 0)
    joint[1:] = 0  # only the sampled dataset's row is non-zero in training
    buffer = random_joint(3, 12, 1)
    got = L.mi_surrogate_loss(joint, buffer, eps=0.0)
    assert abs(float(got) - eq5_by_hand(joint.tolist(), buffer.tolist())) < 1e-12


def test_mi_gradient_equals_exact_mi_gradient_when_buffer_is_true_joint():
    joint = random_joint(3, 12, 2).requires_grad_()
    (grad_surrogate,) = torch.autograd.grad(L.mi_surrogate_loss(joint, joint.detach(), eps=0.0), joint)
    (grad_exact,) = torch.autograd.grad(L.exact_negative_mi(joint, eps=0.0), joint)
    torch.testing.assert_close(grad_surrogate, grad_exact, rtol=1e-10, atol=1e-12)
    # and not for another buffer: the identity is not trivially true
    (grad_other,) = torch.autograd.grad(L.mi_surrogate_loss(joint, random_joint(3, 12, 3)), joint)
    assert (grad_other - grad_exact).abs().max() > 1e-3


def test_mi_weights_give_the_surrogate_and_its_gradient_for_one_dataset_row():
    """The gate's form of Eq. 5 (weights from the buffer, dotted with P(E | D_i)) against ``mi_surrogate_loss`` on
    the joint whose only non-zero row is i, value and gradient, with a buffer column of zeros (experts just added)."""
    buffer = random_joint(3, 12, 5)
    buffer[:, -2:] = 0
    for row in range(3):
        usage = torch.softmax(torch.randn(12, generator=torch.Generator().manual_seed(row), dtype=torch.float64),
                              0).requires_grad_()
        joint = torch.nn.functional.pad(usage[None] / 3, (0, 0, row, 2 - row))
        expected = L.mi_surrogate_loss(joint, buffer)
        (grad_expected,) = torch.autograd.grad(expected, usage)
        got = torch.dot(L.mi_weights(buffer)[row], usage)
        (grad_got,) = torch.autograd.grad(got, usage)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad_got, grad_expected, rtol=1e-12, atol=1e-12)


def test_exact_negative_mi_is_minus_mutual_information():
    independent = torch.outer(torch.tensor([0.5, 0.5]), torch.tensor([0.25, 0.75])).double()
    assert abs(float(L.exact_negative_mi(independent))) < 1e-9
    diagonal = torch.tensor([[0.5, 0.0], [0.0, 0.5]], dtype=torch.float64)
    assert abs(float(L.exact_negative_mi(diagonal)) + math.log(2)) < 1e-6


def test_gate_mi_loss_uses_topk_usage_and_buffer():
    torch.manual_seed(0)
    ctx = RoutingContext(dataset="b")
    gate = PerDatasetGate(8, 6, ["a", "b", "c"], {"a": 2, "b": 2, "c": 2}, loss_coefs={"mi": 1.0}, context=ctx)
    gate.routing_joint.copy_(random_joint(3, 6, 4).float())
    x = torch.randn(25, 8)
    gate(x)
    probs = torch.softmax(x.double() @ gate.routers["b"].proj.weight.double().t(), 1)
    top = probs.topk(2, dim=1)
    g = torch.zeros_like(probs).scatter(1, top.indices, top.values)
    usage = g.mean(0) / g.mean(0).sum()
    joint = torch.zeros(3, 6, dtype=torch.float64)
    joint[1] = usage / 3
    expected = eq5_by_hand(joint.tolist(), gate.routing_joint.double().tolist())
    assert abs(float(gate.losses["mi"].detach()) - expected) < 1e-5
    assert gate.pending_usage[0] == 1
    torch.testing.assert_close(gate.pending_usage[1].double(), usage, rtol=1e-5, atol=1e-7)


def test_buffer_momentum_update():
    ctx = RoutingContext(dataset="a")
    gate = PerDatasetGate(4, 4, ["a", "b"], {"a": 1, "b": 1}, mi_momentum=0.9, context=ctx)
    before = gate.routing_joint.clone()
    usage = torch.tensor([0.7, 0.1, 0.1, 0.1])
    fold_usages([gate], [0], usage)
    torch.testing.assert_close(gate.routing_joint[0], 0.9 * before[0] + 0.1 * usage / 2)
    torch.testing.assert_close(gate.routing_joint[1], before[1])


def test_buffers_of_many_gates_fold_in_one_pass_as_each_would_alone():
    """``fold_usages`` over gates of different widths (a pruned layer) and momenta moves each gate's row as Eq. 4's
    momentum update of that gate alone would, bitwise, and no other row; a skipped step (``applied`` False) leaves
    every buffer, also where the usage is not finite; and its op count does not grow with the number of gates."""
    from mthl_ds.studies.bench.launches import LaunchCount

    def gates(count):
        made = [PerDatasetGate(4, 6 if i % 3 else 4, ["a", "b", "c"], {"a": 1, "b": 1, "c": 1},
                               mi_momentum=0.9 if i % 2 else 0.98) for i in range(count)]
        for i, gate in enumerate(made):
            gate.routing_joint.copy_(random_joint(3, gate.num_experts, i).float())
        return made

    ours = gates(6)
    rows = [i % 3 for i in range(6)]
    usage = torch.rand(sum(g.num_experts for g in ours), generator=torch.Generator().manual_seed(9))
    expected = [g.routing_joint.clone() for g in ours]
    for gate, row, part, joint in zip(ours, rows, usage.split([g.num_experts for g in ours]), expected):
        joint[row] = joint[row] * gate.mi_momentum + part / 3 * (1 - gate.mi_momentum)
    fold_usages(ours, rows, usage, torch.tensor(True))
    assert all(torch.equal(g.routing_joint, joint) for g, joint in zip(ours, expected))
    fold_usages(ours, rows, torch.full_like(usage, float("nan")), torch.tensor(False))
    assert all(torch.equal(g.routing_joint, joint) for g, joint in zip(ours, expected))

    def ops(count):
        counter, made = LaunchCount(), gates(count)
        usage = torch.rand(sum(g.num_experts for g in made))
        with counter:
            fold_usages(made, [0] * count, usage, torch.tensor(True))
        return sum(counter.counts.values())
    assert ops(12) == ops(4)


def test_importance_z_and_load_losses_by_hand():
    gates = torch.tensor([[0.6, 0.4, 0.0], [0.0, 0.5, 0.5]], dtype=torch.float64)
    imp = gates.sum(0)
    assert abs(float(L.importance_loss(gates.sum(0))) - float(imp.var() / imp.mean() ** 2)) < 1e-6
    logits = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    assert abs(float(L.z_loss(logits)) - math.log(math.e + math.e ** 2 + math.e ** 3) ** 2) < 1e-5
    clean = torch.tensor([[0.0, 1.0, 2.0]], dtype=torch.float64)
    noisy = torch.tensor([[0.5, 0.8, 2.1]], dtype=torch.float64)
    # k=1: experts 0 and 1 need to beat the top noisy logit 2.1; expert 2 (in the top) must beat 0.8
    phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    p = torch.tensor([phi((0 - 2.1) / 0.5), phi((1 - 2.1) / 0.5), phi((2 - 0.8) / 0.5)])
    expected = float(p.var() / p.mean() ** 2)
    assert abs(float(L.load_loss(clean, noisy, 0.5, 1)) - expected) < 1e-5


def test_mi_weights_are_computed_in_the_fold_and_again_whenever_the_buffer_changes():
    """After a fold every MI gate's weights are Eq. 5's of its new buffer (gates of two widths and momenta, one
    pass), and reading them then dispatches no op; a write to the buffer (a loaded state dict) or a new buffer
    (surgery) gives fresh weights at the next read, and the forward's MI loss uses them."""
    from mthl_ds.studies.bench.launches import LaunchCount
    made = [PerDatasetGate(4, 6 if i % 2 else 4, ["a", "b"], {"a": 1, "b": 1}, loss_coefs={"mi": 0.01},
                           mi_momentum=0.9 if i % 3 else 0.98, context=RoutingContext(dataset="a")) for i in range(5)]
    usage = torch.rand(sum(g.num_experts for g in made), generator=torch.Generator().manual_seed(3))
    fold_usages(made, [i % 2 for i in range(5)], usage, torch.tensor(True))
    counter = LaunchCount()
    with counter:
        got = [gate.mi_weights() for gate in made]
    assert sum(counter.counts.values()) == 0
    for gate, weights in zip(made, got):
        torch.testing.assert_close(weights, L.mi_weights(gate.routing_joint), rtol=1e-6, atol=0)

    gate = made[1]
    loaded = random_joint(2, 6, 7).float()
    gate.load_state_dict({**gate.state_dict(), "routing_joint": loaded})
    torch.testing.assert_close(gate.mi_weights(), L.mi_weights(loaded), rtol=1e-6, atol=0)
    gate.add_router("c", 1)  # a new buffer with a third row
    assert gate.mi_weights().shape == (3, 6)
    torch.testing.assert_close(gate.mi_weights(), L.mi_weights(gate.routing_joint), rtol=1e-6, atol=0)

    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(4))
    gate.train()
    gate(x)
    gate.set_mi_weights(torch.zeros(3, 6))  # kept for the buffer as it is: the loss uses them, computes none
    gate(x)
    assert float(gate.losses["mi"].detach()) == 0.0
    gate.routing_joint.mul_(1.0)  # a write: the weights are computed again
    gate(x)
    usage = gate.pending_usage[1]
    torch.testing.assert_close(gate.losses["mi"], torch.dot(L.mi_weights(gate.routing_joint)[0], usage))

"""Router losses. Each takes the routing quantities of one MoE call and returns a scalar.

The mutual-information loss is the paper's Eq. 5: a surrogate whose gradient equals the gradient of the
exact -MI of Eq. 3 when the running buffer ``B(D, E)`` equals the true joint distribution (Eq. 4).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

LOSS_NAMES = ("mi", "gshard", "importance", "load", "zloss")


def mi_surrogate_loss(joint: Tensor, buffer: Tensor, eps: float = 1e-9) -> Tensor:
    """Eq. 5: ``-sum_ij [1 + log B_ij] P_ij + sum_j [1 + log sum_i B_ij] P_j``.

    Args:
        joint: ``P(D, E)`` of this forward pass, shape (M, E); rows of datasets not sampled are zero.
        buffer: running estimate ``B(D, E)`` of the joint, shape (M, E); treated as a constant.
    """
    buffer = buffer.detach().to(joint.dtype)
    p_expert = joint.sum(0)
    first = ((1 + torch.log(buffer + eps)) * joint).sum()
    second = ((1 + torch.log(buffer.sum(0) + eps)) * p_expert).sum()
    return -first + second


def mi_weights(buffer: Tensor, eps: float = 1e-9) -> Tensor:
    """Eq. 5 as weights: for a joint whose only non-zero row is ``i``, ``P(D_i, E) = P(E | D_i) / M``,
    ``mi_surrogate_loss(joint, buffer) == (W[i] * P(E | D_i)).sum()`` with
    ``W = (log(sum_i' B_i'j) - log B_ij) / M`` (the 1s of Eq. 5 cancel). (M, E), from the buffer alone."""
    buffer = buffer.detach()
    return (torch.log(buffer.sum(0) + eps) - torch.log(buffer + eps)) / buffer.shape[0]


def exact_negative_mi(joint: Tensor, eps: float = 1e-12) -> Tensor:
    """Eq. 3, ``-MI(D; E)``, with ``P(D)`` the joint's row sums held constant as the paper assumes."""
    p_data = joint.sum(1).detach()
    p_expert = joint.sum(0)
    xlogx = lambda t: t * torch.log(t + eps)  # noqa: E731
    return -xlogx(joint).sum() + xlogx(p_data).sum() + xlogx(p_expert).sum()


def cv_squared(values: Tensor) -> Tensor:
    """Squared coefficient of variation (Shazeer et al. 2017); 0 for a single value."""
    if values.numel() <= 1:
        return values.new_zeros(())
    return values.float().var() / (values.float().mean() ** 2 + 1e-10)


def importance_loss(gate_sums: Tensor) -> Tensor:
    """CV² of the summed gate values per expert. ``gate_sums``: (E,) top-K gate values summed over the tokens."""
    return cv_squared(gate_sums)


def load_loss(clean_logits: Tensor, noisy_logits: Tensor, noise_std: float, k: int) -> Tensor:
    """CV² of Shazeer's smooth load estimator: P(expert i stays in the top-K under fresh noise).

    The threshold for expert i is the K-th largest noisy logit among the others: the (K+1)-th largest
    overall when i is in the top-K, else the K-th largest.
    """
    num_experts = noisy_logits.shape[1]
    top = noisy_logits.topk(min(k + 1, num_experts), dim=1).values
    kth = top[:, k - 1:k]
    kplus1 = top[:, k:k + 1] if k < num_experts else torch.full_like(kth, -math.inf)
    in_top = noisy_logits >= kth
    threshold = torch.where(in_top, kplus1, kth)
    normal = torch.distributions.Normal(0.0, 1.0)
    prob_in_top = normal.cdf((clean_logits - threshold) / noise_std)
    return cv_squared(prob_in_top.sum(0))


def z_loss(logits: Tensor) -> Tensor:
    """Router z-loss (ST-MoE): mean squared log-sum-exp of the router logits."""
    return torch.logsumexp(logits.float(), dim=1).pow(2).mean()

"""Mod-Squad's MoE attention (a mixture of attention heads) for timm ViT blocks."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mthl_ds.moe.gate import PerDatasetGate


class MoEAttention(nn.Module):
    """E attention experts sharing one key and one value projection; each has its own query projection
    (dim -> head_dim) and output projection (head_dim -> dim). The dataset's router picks K experts per token,
    and the token's output is ``sum_k g_k W_o[e_k] Attn(W_q[e_k] x, K, V)``: each chosen query attends to all
    keys of its image. The gate is a :class:`PerDatasetGate` that never drops a route, so the MI loss and the
    routing buffer work as in the MoE MLPs.

    All E query projections run as one matmul and the K chosen are gathered; the output projection runs on the
    gate-weighted scatter of the K results into E slots. Outputs and gradients are those of the sparse top-K
    mixture (an unchosen expert gets exactly zero gradient from a token); the two projections cost E/K times
    their sparse count, the attention itself runs on the K chosen queries only. The parameters are ordinary
    (data-parallel) ones: with ``ep_size > 1`` every rank holds all attention experts.

    Args:
        dim: token width.
        num_experts: E.
        head_dim: width of one expert's query / key / value.
        gate: the per-dataset router (``drop_tokens=False``).
        qkv_bias: biases on the query / key / value projections (timm ViT: True).
        seed: seeds the weights, so every rank and every ep_size builds the same layer.
    """

    def __init__(self, dim: int, num_experts: int, head_dim: int, gate: PerDatasetGate, qkv_bias: bool = True,
                 seed: int = 0):
        super().__init__()
        if gate.drop_tokens:
            raise ValueError("MoE attention routes every token: its gate needs drop_tokens=False")
        self.dim, self.num_experts, self.head_dim = dim, num_experts, head_dim
        self.query = nn.Linear(dim, num_experts * head_dim, bias=qkv_bias)
        self.key_value = nn.Linear(dim, 2 * head_dim, bias=qkv_bias)
        self.out = nn.Linear(num_experts * head_dim, dim)
        self.gate = gate
        generator = torch.Generator().manual_seed(seed)
        for linear in (self.query, self.key_value, self.out):
            nn.init.trunc_normal_(linear.weight, std=0.02, generator=generator)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)

    def router_parameters(self, name: str) -> list[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` of dataset ``name``'s router, named as in this layer's ``named_parameters()``."""
        return [(f"gate.{n}", p) for n, p in self.gate.router_parameters(name)]

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal:
            raise NotImplementedError("MoE attention takes no attention mask")
        b, n, c = x.shape
        e, h = self.num_experts, self.head_dim
        routes = self.gate(x.reshape(b * n, c))  # indices and gates: (K, tokens) each
        k = routes.indices.shape[0]
        chosen = routes.indices.long().t()  # (tokens, K) expert of each route; the gate drops none
        slot = chosen[..., None].expand(-1, -1, h)
        queries = self.query(x).view(b * n, e, h).gather(1, slot)  # (tokens, K, h)
        key, value = self.key_value(x).chunk(2, dim=-1)  # (b, n, h) each
        attended = F.scaled_dot_product_attention(queries.view(b, 1, n * k, h), key[:, None], value[:, None])
        weighted = attended.view(b * n, k, h) * routes.gates.t().to(x.dtype)[..., None]
        mixed = torch.zeros(b * n, e, h, dtype=x.dtype, device=x.device).scatter_add(1, slot, weighted)
        return self.out(mixed.view(b, n, e * h))

"""The MoE MLP: DeepSpeed's ``MoE`` with our per-dataset gate, a drop-in for timm's ``Mlp``."""
from __future__ import annotations

from mthl_ds.runtime import accelerator  # noqa: F401  (before DeepSpeed: names its accelerator)

from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from deepspeed.moe.layer import MoE
from deepspeed.moe.sharded_moe import _AllToAll
from timm.layers import Mlp
from torch import Tensor, nn

from mthl_ds.moe.experts import StackedMlps
from mthl_ds.moe.gate import PerDatasetGate, Routes, exclusive_cumsum
from mthl_ds.moe.grouped import capacity_backend, combine, looped_combine, run_and_combine, run_groups
from mthl_ds.runtime.collectives import all_to_all_equal, all_to_all_rows

UPCYCLE_MODES = ("copy", "split")
DISPATCH = ("capacity", "dropless")


class MoEMlp(MoE):
    """E expert MLPs ``dim -> hidden -> dim`` behind a :class:`PerDatasetGate`.

    Subclasses DeepSpeed's ``MoE`` because the engine sets up expert-parallel groups, splits parameters and
    writes per-expert checkpoint files only for instances of that class. Its experts are stacked tensors
    (:class:`mthl_ds.moe.experts.StackedMlps`, in place of DeepSpeed's ``Experts``) with DeepSpeed's per-expert
    state dict. The forward is ours (see :meth:`forward`); it returns one tensor (timm blocks call
    ``self.mlp(x)``); the gate keeps the losses and counts.

    Args:
        dim: token width (input and output).
        hidden: hidden width of each expert (the paper: dense hidden / K, FLOPs-matched).
        num_experts: experts in the layer over all expert-parallel ranks.
        gate: the layer's gate.
        ep_size: expert-parallel world size; each rank holds ``num_experts // ep_size`` experts.
        act_layer: activation of the experts.
    """

    def __init__(self, dim: int, hidden: int, num_experts: int, gate: PerDatasetGate, ep_size: int = 1,
                 act_layer: type[nn.Module] = nn.GELU, dispatch: str = "capacity"):
        if ep_size < 1 or num_experts % ep_size:
            raise ValueError(f"num_experts={num_experts} is not divisible by ep_size={ep_size}")
        if gate.num_experts != num_experts:
            raise ValueError(f"gate routes over {gate.num_experts} experts, layer has {num_experts}")
        if dispatch not in DISPATCH:
            raise ValueError(f"dispatch {dispatch!r} is not one of {DISPATCH}")
        if dispatch == "dropless" and gate.drop_tokens:
            raise ValueError("dropless dispatch needs a gate that drops no route (drop_tokens=False)")
        super().__init__(hidden_size=dim, expert=Mlp(dim, hidden, act_layer=act_layer), num_experts=num_experts,
                         ep_size=ep_size, k=1)
        self.deepspeed_moe.gate = gate  # replaces DeepSpeed's TopKGate
        self.deepspeed_moe.experts = StackedMlps(dim, hidden, self.num_local_experts, act_layer,
                                                 self.expert_group_name)  # replaces DeepSpeed's Experts
        gate.dispatch = dispatch
        self.dim, self.hidden, self.act_layer, self.dispatch = dim, hidden, act_layer, dispatch
        self.adapter: Optional[Adapter] = None  # the adapter baseline (Houlsby et al.), added by surgery
        self.capacity_experts: Optional[str] = None  # looped / batched; None: grouped.capacity_backend's choice

    @property
    def gate(self) -> PerDatasetGate:
        return self.deepspeed_moe.gate

    @property
    def mlps(self) -> StackedMlps:
        """The experts held by this rank (local indices)."""
        return self.deepspeed_moe.experts

    def router_parameters(self, name: str) -> list[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` of dataset ``name``'s router, named as in this layer's ``named_parameters()``."""
        return self.named_among(p for _, p in self.gate.router_parameters(name))

    def expert_parameters(self, ids: Optional[Iterable[int]] = None) -> list[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` of the experts ``ids`` (local indices; None: every expert this rank holds), named as
        in this layer's ``named_parameters()``: what DeepSpeed treats as expert parameters (expert-parallel, one
        checkpoint file per expert). Given ``ids``, they must make up whole banks (``self.mlps.split(ids)``)."""
        return self.named_among(self.mlps.parameters() if ids is None else self.mlps.parameters_of(ids))

    def named_among(self, params: Iterable[nn.Parameter]) -> list[tuple[str, nn.Parameter]]:
        """``params`` with their names in this layer's ``named_parameters()``, in the order given."""
        names = {id(p): n for n, p in self.named_parameters()}
        return [(names[id(p)], p) for p in params]

    def forward(self, x: Tensor) -> Tensor:
        """DeepSpeed's ``MOELayer`` forward (gate, dispatch, all-to-all, experts, all-to-all, combine) on its
        groups, with fewer ops: a rank's experts run as two batched matmuls (``StackedMlps.forward``) instead
        of a loop with chunk / cat, and dispatch and combine share one
        slot-to-token index (a gather in, a gate-weighted index_add out) with no zero-padded copies. An empty
        slot reads token 0 instead of a zero row: its output is never added back, so its gradient, and its share
        of the expert's weight gradient, is zero. Tensor-parallel experts (DeepSpeed's ``mpu``) are not supported.

        With dropped routes (training's default) every shape follows from the input's and nothing waits for the
        device: a dropped route writes to one spare slot past the last, which is cut off. Without dropping, the
        capacity is the busiest expert's count, read once per call (a host sync), and eval on one rank runs each
        expert on its filled slots only (:meth:`run_filled_slots`, which reads the counts too). In training on one
        CPU rank the experts run one by one over their C slots each, gather and combine fused in
        (``grouped.capacity_backend``, ``grouped.LoopedExperts``).
        """
        moe = self.deepspeed_moe
        tokens = x.reshape(-1, x.shape[-1])
        routes = self.gate(tokens, None, True, False)
        if self.dispatch == "dropless" and self.training:
            return self.with_adapter(self.forward_dropless(tokens, routes).view(x.shape))
        num_experts = routes.num_experts
        capacity = int(routes.capacity)  # a Python int with dropped routes; else the one host sync of this layer
        slots = num_experts * capacity
        indices = routes.indices.t()  # (S, K), contiguous: token-major
        # A kept route's slot is expert * C + location; a dropped one (expert -1, location 0) gives -C, which the
        # remainder sends to the spare slot ``slots`` (kept slots lie in 0..slots - 1, below the modulus).
        slot = (indices * capacity + routes.locations.t()).remainder_(slots + capacity).flatten()
        token_ids = torch.arange(slot.shape[0], device=x.device).div_(indices.shape[1], rounding_mode="floor")
        source = torch.zeros(slots + 1, dtype=torch.long, device=x.device).scatter_(0, slot, token_ids)[:slots]
        # Each slot's gate (0 for an empty slot), by which its output is weighted when it is added back onto its
        # token: the same index as the dispatch. Half-precision outputs are combined in float32, as DeepSpeed does.
        slot_gates = torch.zeros(slots + 1, dtype=torch.float32, device=x.device).scatter(
            0, slot, routes.gates.t().float().flatten())[:slots]
        if self.training and (self.capacity_experts or capacity_backend(x.device, moe.ep_size)) == "looped":
            out = looped_combine(self.mlps, tokens, source, slot_gates, [capacity] * num_experts, pad=False)
            return self.with_adapter(out.view(x.shape))
        dispatched = tokens.index_select(0, source).view(num_experts, capacity, -1)
        if moe.ep_size > 1:
            dispatched = _AllToAll.apply(moe.ep_group, dispatched)
        if self.training or moe.ep_size > 1:
            outputs = self.mlps(dispatched.view(moe.ep_size, self.num_local_experts, capacity, -1))
        else:  # eval keeps every route: capacity is the busiest expert's count, so compute the filled slots only
            outputs = self.run_filled_slots(dispatched, routes.counts.clamp(max=capacity))
        outputs = outputs.view(slots, -1)
        if moe.ep_size > 1:
            outputs = _AllToAll.apply(moe.ep_group, outputs)
        return self.with_adapter(combine(outputs, source, slot_gates, tokens.shape).view(x.shape))

    def with_adapter(self, out: Tensor) -> Tensor:
        """The layer's output, plus its adapter's where surgery added one."""
        return out if self.adapter is None else out + self.adapter(out)

    def forward_dropless(self, tokens: Tensor, routes: Routes) -> Tensor:
        """Every route, none dropped: routes in expert order (from the gate's slots, no sort), each expert run on
        exactly its rows, the outputs weighted by their gates and added back onto their tokens
        (:func:`grouped.run_and_combine`).
        Across expert-parallel ranks the per-expert counts are exchanged first, then the rows, in pieces of
        those sizes (nothing padded); the counts are read on the host once per call to size the exchange."""
        moe = self.deepspeed_moe
        counts = routes.counts  # this rank's routes per expert; none is dropped here
        # a route's row in expert order: its expert's first row plus its slot (its rank there, in token order)
        row = (exclusive_cumsum(counts)[routes.indices.t()] + routes.locations.t()).flatten()
        order = torch.empty_like(row).scatter_(0, row, torch.arange(len(row), device=row.device))
        source = order.div(routes.indices.shape[0], rounding_mode="floor")  # route k of token s is route s * K + k
        gates = routes.gates.t().flatten()[order]
        if moe.ep_size == 1:
            return run_and_combine(self.mlps, tokens, source, gates, counts)
        local = self.num_local_experts
        received = all_to_all_equal(counts.view(moe.ep_size, local), moe.ep_group)  # [source rank, expert]
        send, receive = counts.view(moe.ep_size, local).sum(1).tolist(), received.sum(1).tolist()
        rows = all_to_all_rows(tokens.index_select(0, source), send, receive, moe.ep_group)
        # received by (source rank, local expert); the experts want (local expert, source rank)
        row_expert = torch.repeat_interleave(torch.arange(local, device=rows.device).repeat(moe.ep_size),
                                             received.flatten(), output_size=len(rows))
        by_expert = row_expert.argsort(stable=True)
        outputs = run_groups(self.mlps, rows[by_expert], received.sum(0))
        outputs = all_to_all_rows(outputs[by_expert.argsort()], receive, send, moe.ep_group)
        return combine(outputs, source, gates, tokens.shape)

    def run_filled_slots(self, dispatched: Tensor, filled: Tensor) -> Tensor:
        """``[E, C, d] -> same`` on one device: each expert on its first ``filled[e]`` slots (the others are
        empty and stay zero). In eval no route is dropped, so the capacity is the busiest expert's count and the
        batched form would also compute the empty slots of every other expert (up to E / K times the routed
        work when routing is skewed)."""
        out = torch.zeros_like(dispatched)
        for e, (expert, count) in enumerate(zip(self.mlps.per_expert(), filled.tolist())):
            if count:
                out[e, :count] = self.mlps.run(expert, dispatched[e, :count])
        return out

    # ---- surgery: single device (ep_size 1), between runs; mthl_ds.artifacts.surgery applies it to a whole model
    def set_experts(self, tensors: list[Tensor]) -> None:
        """Hold exactly the experts of the stacked ``tensors`` (all of them: ep_size must be 1), in one bank."""
        if self.ep_size != 1:
            raise ValueError(
                f"expert surgery needs the single-device model (ep_size 1), this layer has ep_size {self.ep_size}")
        self.mlps.set_experts(tensors)
        self.deepspeed_moe.num_local_experts = self.num_local_experts = self.num_experts = len(tensors[0])

    def check_kept(self, kept: list[int]) -> None:
        if not kept or len(set(kept)) != len(kept) or not all(0 <= e < self.num_experts for e in kept):
            raise ValueError(f"kept experts {kept} must be distinct indices in 0..{self.num_experts - 1}")
        self.gate.pruned_choices(kept)

    @torch.no_grad()
    def keep_experts(self, kept: list[int]) -> None:
        """Keep the experts ``kept`` (in that order); routers are re-indexed (see ``PerDatasetGate.keep_experts``)."""
        self.check_kept(kept)
        self.gate.keep_experts(kept)
        stacks = self.mlps.stacks()
        self.set_experts([t.index_select(0, torch.tensor(kept, device=t.device)) for t in stacks])

    @torch.no_grad()
    def add_experts(self, count: int, seed: int) -> None:
        """``count`` new experts after the existing ones, initialised like fresh ones (keyed on their index)."""
        first = self.num_experts
        new = StackedMlps(self.dim, self.hidden, count, self.act_layer, self.expert_group_name)
        for local in range(count):
            init_expert(new.expert(local), seed * 1_000_003 + first + local)
        self.gate.add_experts(count)
        self.set_experts([torch.cat([old, added.to(old.device)])
                          for old, added in zip(self.mlps.stacks(), new.stacks())])

    @torch.no_grad()
    def init_weights(self, seed: int, ep_rank: int = 0) -> None:
        """Give every expert its own init, keyed on its *global* index, so the model is the same for any ep_size."""
        for local in range(self.num_local_experts):
            init_expert(self.mlps.expert(local), seed * 1_000_003 + ep_rank * self.num_local_experts + local)

    @torch.no_grad()
    def upcycle(self, dense: Mlp, mode: str, top_k: int, ep_rank: int = 0) -> None:
        """Initialise the experts from the dense MLP this layer replaces.

        ``copy``: every expert is the dense MLP (needs hidden == dense hidden); with renormalised gates the
        layer then computes exactly the dense MLP. ``split``: the dense hidden units are cut into K chunks and
        expert e takes chunk ``e % K`` with its output weights scaled by K; a token whose K renormalised gates
        fall one on each chunk, with equal weight, gets exactly the dense output.
        """
        if mode not in UPCYCLE_MODES:
            raise ValueError(f"upcycle mode {mode!r} is not one of {UPCYCLE_MODES}")
        dense_hidden = dense.fc1.out_features
        if mode == "copy" and dense_hidden != self.hidden:
            raise ValueError(f"upcycle 'copy' needs expert hidden {self.hidden} == dense hidden {dense_hidden}")
        if mode == "split" and dense_hidden != self.hidden * top_k:
            raise ValueError(
                f"upcycle 'split' needs dense hidden {dense_hidden} == expert hidden {self.hidden} x K={top_k}")
        for local in range(self.num_local_experts):
            if mode == "copy":
                rows, scale = slice(None), 1.0
            else:
                chunk = (ep_rank * self.num_local_experts + local) % top_k
                rows, scale = slice(chunk * self.hidden, (chunk + 1) * self.hidden), float(top_k)
            w1, b1, w2, b2 = self.mlps.expert(local)
            w1.copy_(dense.fc1.weight[rows])
            b1.copy_(dense.fc1.bias[rows])
            w2.copy_(dense.fc2.weight[:, rows] * scale)
            b2.copy_(dense.fc2.bias)


def init_expert(tensors: tuple[Tensor, ...], seed: int) -> None:
    """A fresh expert's weights (truncated normal, std 0.02, from a generator seeded with ``seed``: fc1's weight,
    then fc2's) and zero biases, filled in place."""
    gen = torch.Generator().manual_seed(seed)
    w1, b1, w2, b2 = tensors
    for weight, bias in ((w1, b1), (w2, b2)):
        nn.init.trunc_normal_(weight, std=0.02, generator=gen)
        nn.init.zeros_(bias)


class Adapter(nn.Module):
    """A bottleneck adapter ``x -> up(gelu(down(x)))``, added to the MoE MLP's output. ``up`` starts at zero,
    so a fresh adapter leaves the model's outputs unchanged."""

    def __init__(self, dim: int, bottleneck: int):
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.up(F.gelu(self.down(x)))

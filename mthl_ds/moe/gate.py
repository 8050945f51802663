"""The per-dataset gate: one router per dataset, top-K of Softmax(x W) (Eq. 2), router losses.

The gate plugs into DeepSpeed's ``MOELayer`` in place of its ``TopKGate``: it is called as
``gate(x, used_token, sparse_routes, use_tutel)`` and returns DeepSpeed's sparse-route tuple
``(l_aux, capacity, num_experts, indices, locations, gates, counts)`` (a :class:`Routes`, read by field name
here and unpacked by position in DeepSpeed's ``MOELayer``), so DeepSpeed does the dispatch,
the all-to-all and expert parallelism. Routes and capacity follow DeepSpeed's ``topkgating`` (its "probs" drop
policy; :func:`top_k_routes` is it in DeepSpeed's layout), with ties broken by index and the work done on the
K x S routes (:func:`route`); the gate values are Eq. 2's, not renormalised.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Mapping, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mthl_ds.moe import losses as L
from mthl_ds.runtime.collectives import all_reduce_

DATASET_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def top_k_routes(logits: Tensor, k: int, capacity_factor: float, min_capacity: int, drop_tokens: bool,
                 ep_group=None) -> tuple[Tensor, int | Tensor, Tensor, Tensor, Tensor]:
    """DeepSpeed's ``topkgating(..., drop_policy="probs", sparse_routes=True)`` with every tie broken by index:
    :func:`route` on ``softmax(logits)``, returned in DeepSpeed's layout, with DeepSpeed's slots: each expert's
    kept routes fill its slots in token order (:func:`route` fills the same slots in probability order).

    Returns ``(l_aux, capacity, indices, locations, counts)``: routes as (K, S) rows, highest gate first, with
    index -1 for a dropped route (location 0); ``counts`` per expert before drops.
    """
    routing = route(F.softmax(logits.float(), dim=1), k, capacity_factor, min_capacity, drop_tokens, ep_group,
                    balance_loss=True)
    locations = routing.locations
    if drop_tokens:  # the kept routes' ranks in token order; dropped routes last, in a group of their own
        group = torch.where(routing.kept, routing.experts, logits.shape[1]).flatten()
        starts = exclusive_cumsum(F.pad(routing.counts.clamp(max=routing.capacity), (0, 1)))
        locations = rank_in_group(group, group, starts).view_as(routing.experts)
    indices = torch.where(routing.kept, routing.experts, -1)
    return (routing.l_aux, routing.capacity, indices.t().contiguous().int(),
            (locations * routing.kept).t().contiguous().int(), routing.counts)


class Routing(NamedTuple):
    """The routes of S tokens, K each, token-major: (S, K) tensors, column 0 the highest probability."""
    l_aux: Optional[Tensor]  # GShard's balance loss (None where it was not asked for)
    capacity: int | Tensor  # slots per expert
    experts: Tensor  # (S, K) long: each route's expert (column of ``probs``)
    kept: Tensor  # (S, K) bool: within capacity
    locations: Tensor  # (S, K) long: a kept route's slot in its expert (anything for a dropped route)
    counts: Tensor  # (E,) long: routes per expert before drops


def route(probs: Tensor, k: int, capacity_factor: float, min_capacity: int, drop_tokens: bool,
          ep_group=None, balance_loss: bool = False) -> Routing:
    """Each token's K experts of highest probability; with ``drop_tokens`` each expert keeps the
    ``max(ceil(capacity_factor * K * S / E), min_capacity)`` of its routes of highest probability, else the
    capacity is the busiest expert's count (max over ``ep_group``; none: this rank's own). ``balance_loss``:
    also GShard's balance loss (``l_aux``; else None).

    The work is on the K x S routes, not on the (S, E) table: one stable sort of the routes by expert, then
    probability (by expert alone without drops), gives every route's rank in its expert. Equal values go to the
    lower expert index and the earlier token, whatever else is in the batch, on every rank (``torch.topk``
    leaves their order to the kernel). A kept route's slot is that rank: with drops, each expert's slots are
    filled in order of probability (DeepSpeed fills the same slots in token order, :func:`top_k_routes`; the
    outputs do not depend on the order), without, in token order. With ``drop_tokens`` the capacity is a Python
    int and every shape follows from the input's: no host sync. Without, it is a 0-dim tensor, which the
    caller reads to size its buffers.
    """
    tokens, num_experts = probs.shape
    if k == 1:  # argmax returns the first of equal maxima
        experts = probs.argmax(dim=1, keepdim=True)
    else:
        experts = probs.sort(dim=1, descending=True, stable=True).indices[:, :k]
    flat = experts.flatten()  # token-major: the earlier token first
    counts = torch.zeros(num_experts, dtype=torch.long, device=probs.device).index_add_(
        0, flat, torch.ones_like(flat))
    l_aux = (probs.mean(0) * (counts / tokens)).mean() * num_experts * num_experts / k if balance_loss else None
    if not drop_tokens:
        capacity = counts.max()
        if ep_group is not None:  # the experts' group (set by DeepSpeed's engine)
            capacity = all_reduce_(capacity, "max", ep_group)
        locations = rank_in_group(flat, flat, exclusive_cumsum(counts))
        return Routing(l_aux, capacity, experts, torch.ones_like(experts, dtype=torch.bool),
                       locations.view_as(experts), counts)
    capacity = max(math.ceil(tokens / num_experts * capacity_factor * k), min_capacity)
    # Sorted by expert, then by probability, highest first: probabilities are >= 0, so their float32 bits
    # (as int32, below 2^31) order like the values, and bits - expert * 2^31 (int64) is one key, sorted descending.
    bits = probs.detach().gather(1, experts).flatten().view(torch.int32)
    rank = rank_in_group(torch.sub(bits, flat, alpha=2 ** 31), flat, exclusive_cumsum(counts),
                         descending=True).view_as(experts)
    return Routing(l_aux, capacity, experts, rank < capacity, rank, counts)


def exclusive_cumsum(counts: Tensor) -> Tensor:
    return counts.cumsum(0) - counts


def rank_in_group(key: Tensor, group: Tensor, starts: Tensor, descending: bool = False) -> Tensor:
    """Each element's rank among the elements of its ``group`` ordered by ``key``, ascending or ``descending``
    (equal keys: earlier first); ``key`` in that order orders groups as ``group`` does ascending, and group g's
    ranks start after ``starts[g]`` elements."""
    order = key.argsort(descending=descending, stable=True)
    rank = torch.arange(len(key), device=key.device) - starts[group[order]]
    return torch.empty_like(rank).scatter_(0, order, rank)


class Routes(NamedTuple):
    """A gate's routes of S tokens to E experts: DeepSpeed's sparse-route tuple, in its order (a tuple, so DeepSpeed
    unpacks it by position)."""
    l_aux: Optional[Tensor]  # GShard's balance loss of this call (None unless the gshard loss is trained)
    capacity: int | Tensor  # slots per expert: a Python int with dropped routes, else a 0-dim tensor
    num_experts: int  # E
    # (K, S) views of token-major (S, K) tensors, whose ``.t()`` is contiguous:
    indices: Tensor  # long: each route's expert, highest gate first; -1 for a dropped route
    locations: Tensor  # long: each route's slot in its expert (0 for a dropped route)
    gates: Tensor  # each route's gate value (0 for a dropped route)
    counts: Tensor  # (E,): routes per expert, before capacity drops


@dataclass
class RoutingContext:
    """State shared by every gate of one model: the dataset being run and a counter of model forwards.

    The counter lets a gate tell a fresh forward from a recomputation of the same one (activation
    checkpointing re-runs blocks in backward), so routing statistics are recorded once per forward.
    """
    dataset: Optional[str] = None
    forward_id: int = 0


class Router(nn.Module):
    """``x -> logits``: a linear map, or a small MLP when ``hidden > 0``. Runs in float32.

    Logit ``i`` selects the layer's expert ``choices[i]``. A fresh router has one logit per expert
    (``choices = 0..E-1``); surgery changes that: after pruning, a removed expert's logit stays with
    ``choices = -1``, in the softmax but never selected, so Eq. 2's gate values of the kept experts do not
    change; after experts are added, an old router has no logit for them and can never select them.
    """

    def __init__(self, dim: int, num_experts: int, hidden: int = 0):
        super().__init__()
        self.hidden = nn.Linear(dim, hidden) if hidden else None
        self.proj = nn.Linear(hidden or dim, num_experts, bias=False)
        self.register_buffer("choices", torch.arange(num_experts))
        # The logits that select an expert, derived from ``choices`` whenever it is set or loaded (not saved): a
        # forward indexes with it, so its shapes do not depend on values (``nonzero`` would sync every call).
        self.register_buffer("selectable_index", torch.arange(num_experts), persistent=False)
        self.in_order = True  # logit i selects expert i, for every logit (set with ``choices``): nothing to re-index
        self.register_load_state_dict_post_hook(reindex_after_load)

    def set_choices(self, choices: Tensor) -> None:
        """Set which expert each logit selects (-1: none), the index of the selecting ones and :attr:`in_order`."""
        self.choices = choices.to(self.choices.device)
        self.selectable_index = (self.choices >= 0).nonzero().flatten()
        self.in_order = torch.equal(self.choices, torch.arange(len(self.choices), device=self.choices.device))

    def forward(self, x: Tensor) -> Tensor:
        x = x.float()
        if self.hidden is not None:
            x = F.gelu(F.linear(x, self.hidden.weight.float(), self.hidden.bias.float()))
        return F.linear(x, self.proj.weight.float())

    def selectable(self) -> Tensor:
        """Indices of the logits that select an expert."""
        return self.selectable_index


def reindex_after_load(router: Router, incompatible_keys) -> None:
    router.set_choices(router.choices)


class PerDatasetGate(nn.Module):
    """Top-K gate with one router per dataset and the router losses of the paper and its baselines.

    Args:
        dim: token width.
        num_experts: E, experts in the layer (all ranks together).
        datasets: dataset names; one router each, in this order (the rows of the MI buffer).
        top_k: K per dataset.
        capacity_factor: DeepSpeed's: each expert takes ``ceil(factor * K * S / E)`` of the S local tokens.
        eval_capacity_factor: the same in eval mode, with ``eval_drop_tokens``.
        min_capacity: lower bound on that capacity.
        drop_tokens: drop routes over capacity in training; ``False`` sizes capacity to the busiest expert
            (all-reduced over the expert-parallel group).
        eval_drop_tokens: the same in eval mode; ``False`` (the default) keeps every route, so an image's output
            does not depend on the rest of its batch.
        renormalize: rescale the K gate values to sum to 1 (DeepSpeed's behaviour); Eq. 2 does not.
        noise_std: std of Gaussian noise added to the logits in training (noisy top-K gating).
        router_hidden: 0 for a linear router, else the hidden width of an MLP router.
        loss_coefs: coefficient per router loss (names in ``losses.LOSS_NAMES``); a loss with a zero
            coefficient is not computed.
        mi_momentum: momentum of the running joint ``B(D, E)``.
        context: the model's shared :class:`RoutingContext`.
    """

    def __init__(self, dim: int, num_experts: int, datasets: Sequence[str], top_k: Mapping[str, int],
                 capacity_factor: float = 1.0, eval_capacity_factor: float = 1.0, min_capacity: int = 4,
                 drop_tokens: bool = True, eval_drop_tokens: bool = False, renormalize: bool = False,
                 noise_std: float = 0.0,
                 router_hidden: int = 0, loss_coefs: Optional[Mapping[str, float]] = None,
                 mi_momentum: float = 0.98, context: Optional[RoutingContext] = None):
        super().__init__()
        if not datasets:
            raise ValueError("a gate needs at least one dataset")
        for name in datasets:
            if not DATASET_NAME.match(name):
                raise ValueError(f"dataset name {name!r} must be an identifier (letters, digits, _)")
        if set(top_k) != set(datasets):
            raise ValueError(f"top_k must name every dataset {list(datasets)}, got {sorted(top_k)}")
        for name, k in top_k.items():
            if not 1 <= k <= num_experts:
                raise ValueError(f"top_k={k} for dataset {name!r} must be between 1 and num_experts={num_experts}")
        coefs = dict(loss_coefs or {})
        unknown = set(coefs) - set(L.LOSS_NAMES)
        if unknown:
            raise ValueError(f"unknown router loss {sorted(unknown)}; choose from {L.LOSS_NAMES}")
        if coefs.get("load", 0) > 0 and noise_std <= 0:
            raise ValueError("the load loss needs noisy gating: set noise_std > 0")
        self.dim, self.num_experts, self.router_hidden = dim, num_experts, router_hidden
        self.datasets = list(datasets)
        self.top_k = dict(top_k)
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.min_capacity = min_capacity
        self.drop_tokens = drop_tokens
        self.eval_drop_tokens = eval_drop_tokens
        self.renormalize = renormalize
        self.noise_std = noise_std
        self.loss_coefs = {k: v for k, v in coefs.items() if v}
        self.mi_momentum = mi_momentum
        self.context = context if context is not None else RoutingContext()
        self.ep_group = None
        # "dropless": the layer reads no capacity in training, so none is exchanged (set by ``MoEMlp``)
        self.dispatch = "capacity"
        self.routers = nn.ModuleDict({name: Router(dim, num_experts, router_hidden) for name in datasets})
        m = len(datasets)
        self.register_buffer("routing_joint", torch.full((m, num_experts), 1.0 / (m * num_experts)))
        # Filled by each forward: unweighted losses, per-expert route counts (before capacity drops),
        # and the dataset's mean routing distribution waiting to be folded into the buffer.
        self.losses: dict[str, Tensor] = {}
        self.counts: Optional[Tensor] = None
        self.routes, self.capacity = 0, None  # routes of the last forward, and its capacity
        self.pending_usage: Optional[tuple[int, Tensor]] = None
        self._recorded_forward = -1
        # Eq. 5's weights of ``routing_joint`` (float32), with the buffer and its version they were computed from
        self._mi_weights: Optional[tuple[Tensor, int, Tensor]] = None

    def _set_ep_group(self, ep_group) -> None:
        self.ep_group = ep_group

    def dataset_index(self, name: str) -> int:
        return self.datasets.index(name)

    def router_parameters(self, name: str) -> list[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` of dataset ``name``'s router, named as in this gate's ``named_parameters()``."""
        if name not in self.routers:
            raise KeyError(f"this gate has no router for dataset {name!r}; it routes {sorted(self.routers)}")
        return [(f"routers.{name}.{n}", p) for n, p in self.routers[name].named_parameters()]

    def forward(self, x: Tensor, used_token: Optional[Tensor] = None, sparse_routes: bool = True,
                use_tutel: bool = False) -> Routes:
        if used_token is not None or not sparse_routes or use_tutel:
            raise NotImplementedError("PerDatasetGate supports DeepSpeed's sparse routes only")
        name = self.context.dataset
        if name is None:
            raise RuntimeError("no dataset set: call model.set_dataset(name) before forward")
        if name not in self.routers:
            raise KeyError(f"this layer has no router for dataset {name!r}; it routes {sorted(self.routers)}")
        k = self.top_k[name]
        router = self.routers[name]
        clean = router(x)
        logits = clean
        if self.training and self.noise_std > 0:
            logits = clean + torch.randn_like(clean) * self.noise_std
        probs = logits.softmax(dim=1)  # Eq. 2, over every logit
        # Routes and capacity over the logits that select an expert (all of them but after pruning), their
        # positions then mapped to experts (nothing to map while logit i selects expert i, for every expert).
        selectable = router.selectable()
        targets = None if router.in_order and logits.shape[1] == self.num_experts else router.choices[selectable]
        every = selectable.shape[0] == logits.shape[1]
        eq2 = probs if every else probs[:, selectable]
        training = self.training
        routing = route(eq2 if every else logits[:, selectable].softmax(dim=1), k,
                        self.capacity_factor if training else self.eval_capacity_factor, self.min_capacity,
                        self.drop_tokens if training else self.eval_drop_tokens,
                        None if training and self.dispatch == "dropless" else self.ep_group,
                        balance_loss=training and "gshard" in self.loss_coefs)
        top_gates = eq2.gather(1, routing.experts)  # (S, K): G(x) of Eq. 2 on each token's K experts
        gates = top_gates * routing.kept
        if self.renormalize:  # DeepSpeed's: the kept gates of each token sum to 1
            gates = gates / gates.sum(1, keepdim=True).clamp(min=torch.finfo(gates.dtype).eps)
        indices = torch.where(routing.kept, routing.experts if targets is None else targets[routing.experts], -1)
        self.counts = routing.counts if targets is None else torch.zeros(
            self.num_experts, dtype=routing.counts.dtype, device=x.device).index_add_(0, targets, routing.counts)
        self.routes, self.capacity = routing.experts.numel(), routing.capacity
        if training:
            self._router_losses(name, k, top_gates, routing.experts, targets, selectable, clean, logits,
                                routing.l_aux)
        # (K, S) views of the token-major tensors: ``.t()`` gives them back contiguous, with no copy
        return Routes(routing.l_aux, routing.capacity, self.num_experts, indices.t(),
                      (routing.locations * routing.kept).t(), gates.t(), self.counts)

    def dropped(self) -> Tensor:
        """How many routes of the last forward capacity dropped (0-dim, on the device)."""
        return (self.counts - self.capacity).clamp(min=0).sum()

    def _router_losses(self, name: str, k: int, top_gates: Tensor, top_idx: Tensor, targets: Optional[Tensor],
                       selectable: Tensor, clean: Tensor, logits: Tensor, l_aux: Optional[Tensor]) -> None:
        """The router losses of this forward from the routes: ``top_gates`` (S, K), Eq. 2's values at the
        selectable logits ``top_idx``, whose experts are ``targets`` (None: logit i is expert i)."""
        gate_sums = torch.zeros(selectable.shape[0], dtype=top_gates.dtype, device=top_gates.device).index_add(
            0, top_idx.flatten(), top_gates.flatten())  # G(x) of Eq. 2 summed over the tokens, per logit
        usage = gate_sums if targets is None else torch.zeros(
            self.num_experts, dtype=top_gates.dtype, device=top_gates.device).index_add(0, targets, gate_sums)
        usage = usage / usage.sum().clamp(min=1e-9)  # P(E | D_i)
        row = self.dataset_index(name)
        losses = {}
        if "mi" in self.loss_coefs:  # Eq. 5, linear in this forward's P(D, E): only the dataset's row is not zero
            losses["mi"] = torch.dot(self.mi_weights()[row], usage.float())
        if "gshard" in self.loss_coefs:
            losses["gshard"] = l_aux
        if "importance" in self.loss_coefs:
            losses["importance"] = L.importance_loss(gate_sums)
        if "load" in self.loss_coefs:
            losses["load"] = L.load_loss(clean[:, selectable], logits[:, selectable], self.noise_std, k)
        if "zloss" in self.loss_coefs:
            losses["zloss"] = L.z_loss(clean)
        self.losses = losses
        if self._recorded_forward != self.context.forward_id:
            self._recorded_forward = self.context.forward_id
            self.pending_usage = (row, usage.detach())

    def mi_weights(self) -> Tensor:
        """Eq. 5 as weights of ``B(D, E)`` (:func:`losses.mi_weights`, float32, (M, E)), kept until the buffer
        changes. A model computes every gate's at once (:func:`compute_mi_weights`: in the fold after each step, and
        in the backbone's forward where a buffer changed since), so its gates find them ready; a gate used alone
        computes its own here."""
        if not self.mi_weights_current():
            self.set_mi_weights(L.mi_weights(self.routing_joint.float()))
        return self._mi_weights[2]

    def mi_weights_current(self) -> bool:
        """Whether the kept MI weights are those of the buffer as it is: the same tensor, not written to since (its
        version counter: a loaded state dict, an update)."""
        kept, joint = self._mi_weights, self.routing_joint
        return kept is not None and kept[0] is joint and kept[1] == joint._version

    def set_mi_weights(self, weights: Tensor) -> None:
        """Keep ``weights`` as the MI weights of the buffer as it is now."""
        self._mi_weights = (self.routing_joint, self.routing_joint._version, weights)

    def weighted_loss(self) -> Tensor | float:
        return sum(self.loss_coefs[n] * v for n, v in self.losses.items())

    # ---- surgery: single-device, between runs (mthl_ds.artifacts.surgery applies it to a whole model)
    @torch.no_grad()
    def add_router(self, name: str, k: int) -> None:
        """A new router for ``name`` over all experts, and a row for it in ``B(D, E)``.

        The old rows are scaled by M / (M + 1) (each dataset's share of the joint) and the new row starts
        uniform over the experts; momentum then moves it to the dataset's measured routing.
        """
        if not DATASET_NAME.match(name):
            raise ValueError(f"dataset name {name!r} must be an identifier (letters, digits, _)")
        if name in self.routers:
            raise ValueError(f"this layer already has a router for dataset {name!r}")
        if not 1 <= k <= self.num_experts:
            raise ValueError(f"top_k={k} for dataset {name!r} must be between 1 and num_experts={self.num_experts}")
        self.routers[name] = Router(self.dim, self.num_experts, self.router_hidden).to(self.routing_joint.device)
        self.top_k[name] = k
        if name not in self.datasets:
            m = len(self.datasets)
            row = torch.full((1, self.num_experts), 1.0 / ((m + 1) * self.num_experts))
            self.routing_joint = torch.cat([self.routing_joint * m / (m + 1), row.to(self.routing_joint)])
            self.datasets.append(name)

    def remove_router(self, name: str) -> None:
        """Drop ``name``'s router; its row of ``B(D, E)`` stays (the MI loss of new datasets still uses it)."""
        del self.routers[name]
        del self.top_k[name]

    def set_top_k(self, name: str, k: int) -> None:
        selectable = len(self.routers[name].selectable())
        if not 1 <= k <= selectable:
            raise ValueError(
                f"top_k={k} for dataset {name!r} must be between 1 and its {selectable} selectable experts")
        self.top_k[name] = k

    def pruned_choices(self, kept: Sequence[int]) -> dict[str, Tensor]:
        """Each router's ``choices`` once only the experts ``kept`` (old indices, in their new order) remain;
        refused if a router would be left fewer experts than its K. Changes nothing."""
        remap = torch.full((self.num_experts + 1,), -1, dtype=torch.long)
        remap[torch.tensor(list(kept), dtype=torch.long)] = torch.arange(len(kept))
        choices = {}
        for name, router in self.routers.items():
            choices[name] = remap[router.choices.cpu()]  # -1 (already unselectable) reads remap[-1] = -1
            left = int((choices[name] >= 0).sum())
            if left < self.top_k[name]:
                raise ValueError(f"pruning to {len(kept)} experts leaves the router of {name!r} {left} experts, "
                                 f"fewer than its top_k={self.top_k[name]}")
        return choices

    @torch.no_grad()
    def keep_experts(self, kept: Sequence[int]) -> None:
        """Re-index to the experts ``kept``; a removed expert's logit stays in its router's softmax, unselectable."""
        for name, choices in self.pruned_choices(kept).items():
            self.routers[name].set_choices(choices)
        self.routing_joint = self.routing_joint[:, list(kept)].clone()
        self.num_experts = len(kept)

    @torch.no_grad()
    def add_experts(self, count: int) -> None:
        """``count`` new experts at the end. Existing routers have no logit for them, so never select them."""
        extra = torch.zeros(len(self.datasets), count, dtype=self.routing_joint.dtype, device=self.routing_joint.device)
        self.routing_joint = torch.cat([self.routing_joint, extra], dim=1)
        self.num_experts += count


@torch.no_grad()
def fold_usages(gates: Sequence[PerDatasetGate], rows: Sequence[int], usage: Tensor,
                applied: Optional[Tensor] = None) -> None:
    """Momentum-update row ``rows[i]`` of gate ``i``'s ``B(D, E)`` with ``P(E | D_row) / M``, its slice of ``usage``
    (the gates' ``P(E | D)`` one after another, already averaged over ranks); where ``applied`` (a 0-dim bool
    tensor) is False every row stays, also if ``usage`` is not finite. One pass over all rows for each group of
    gates with the same momentum, dataset count and buffer dtype and device (one group in a model built from one
    recipe). Then the gates' MI weights of the new buffers (:func:`compute_mi_weights`)."""
    groups: dict[tuple, list[tuple[Tensor, Tensor]]] = {}
    for gate, row, part in zip(gates, rows, usage.split([gate.num_experts for gate in gates])):
        joint = gate.routing_joint
        groups.setdefault((gate.mi_momentum, len(gate.datasets), joint.dtype, joint.device), []).append(
            (joint[row], part))
    for (m, datasets, dtype, _), members in groups.items():
        views = [view for view, _ in members]
        current = torch.cat(views)
        target = torch.cat([part for _, part in members]).to(dtype) / datasets
        updated = current * m + target * (1 - m)
        if applied is not None:
            updated = torch.where(applied, updated, current)
        torch._foreach_copy_(views, list(updated.split([len(view) for view in views])))
    compute_mi_weights(gates)


@torch.no_grad()
def compute_mi_weights(gates: Sequence[PerDatasetGate]) -> None:
    """Keep the MI weights (:meth:`PerDatasetGate.mi_weights`) of every gate that trains the MI loss, in one pass per
    group of gates with the same dataset count and device: Eq. 5's weights are per column of ``B(D, E)``, so the
    buffers side by side give each gate's own. The fold and the backbone's forward both compute them here, so a
    resumed run's weights are bitwise those of the run it resumes."""
    groups: dict[tuple, list[PerDatasetGate]] = {}
    for gate in gates:
        if "mi" in gate.loss_coefs:
            groups.setdefault((len(gate.datasets), gate.routing_joint.device), []).append(gate)
    for members in groups.values():
        weights = L.mi_weights(torch.cat([gate.routing_joint.float() for gate in members], dim=1))
        for gate, part in zip(members, weights.split([gate.num_experts for gate in members], dim=1)):
            gate.set_mi_weights(part)

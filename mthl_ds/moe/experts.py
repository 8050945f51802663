"""A MoE layer's experts as stacked tensors: for each linear layer of timm's ``Mlp`` (``fc2(act(fc1(x)))``) one
weight ``[E, out, in]`` and one bias ``[E, out]`` for the E experts a rank holds, in place of DeepSpeed's
``Experts`` (a ModuleList of E ``Mlp``, 4E tensors).

Every tensor costs per step: DeepSpeed's ZeRO 1/2 hooks its gradient and copies it twice (into the reduce
bucket, then into the partition), and the optimizer, the gradient norm and the fp16 overflow check walk it. With
12 experts per layer that was 48 tensors per layer where the dense MLP has 4. What stays per expert:

- the state dict: expert e's weights are ``deepspeed_experts.{e}.fc1.weight`` ... as in DeepSpeed's ``Experts``,
  so DeepSpeed writes one checkpoint file per expert and exports read as before;
- LAMB's trust ratio and idle check: a stacked tensor carries ``segments`` (its first dimension), which
  ``mthl_ds.runtime.optim`` treats as that many tensors;
- ``requires_grad``: the experts live in banks, each a set of experts with its own four tensors. One bank holds
  them all, unless some experts train and others stay frozen (adaptation: :meth:`StackedMlps.split`).
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PARAMS = ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")
KEYS = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")  # an expert's names in DeepSpeed's Experts (timm Mlp)


class Bank(nn.Module):
    """Some experts' MLPs, stacked: ``fc1_weight [n, hidden, dim]``, ``fc1_bias [n, hidden]``,
    ``fc2_weight [n, dim, hidden]``, ``fc2_bias [n, dim]``. Its state is written and read by its
    :class:`StackedMlps`, per expert."""

    def __init__(self, tensors: Sequence[Tensor], group_name: str, requires_grad: bool = True):
        super().__init__()
        for name, tensor in zip(PARAMS, tensors):
            param = nn.Parameter(tensor, requires_grad=requires_grad)
            # what DeepSpeed's Experts marks on its parameters (expert-parallel, no data-parallel all-reduce),
            # and the number of experts LAMB splits the tensor into
            param.allreduce, param.group_name, param.segments = False, group_name, len(tensor)
            self.register_parameter(name, param)

    def tensors(self) -> tuple[Tensor, ...]:
        return tuple(getattr(self, name) for name in PARAMS)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        pass  # per expert, by the StackedMlps

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        pass


class StackedMlps(nn.Module):
    """``count`` expert MLPs ``dim -> hidden -> dim`` of one MoE layer on this rank, stacked in banks.

    :meth:`stacks` gives the four tensors in expert order (the banks' tensors themselves when there is one bank);
    the state dict has each expert's ``deepspeed_experts.{e}.fc1.weight`` ... (local index e).
    """

    def __init__(self, dim: int, hidden: int, count: int, act_layer: type[nn.Module], group_name: str):
        super().__init__()
        self.dim, self.hidden, self.group_name = dim, hidden, group_name
        self.act = act_layer()
        shapes = ((hidden, dim), (hidden,), (dim, hidden), (dim,))
        self.banks = nn.ModuleList([Bank([torch.zeros(count, *s) for s in shapes], group_name)])
        self.ids: list[list[int]] = [list(range(count))]  # the experts of each bank, in its order
        # where each expert's row is in the banks' tensors concatenated (with several banks), per device: not a
        # buffer, which DeepSpeed would broadcast from rank 0 to ranks whose banks may differ
        self.order: dict[torch.device, Tensor] = {}

    @property
    def num_local_experts(self) -> int:
        return sum(len(ids) for ids in self.ids)

    def stacks(self) -> tuple[Tensor, ...]:
        """``(fc1 weight, fc1 bias, fc2 weight, fc2 bias)``, each ``[E, ...]`` in expert order."""
        if len(self.banks) == 1:
            return self.banks[0].tensors()
        device = self.banks[0].fc1_weight.device
        if device not in self.order:
            self.order[device] = torch.tensor([e for ids in self.ids for e in ids]).argsort().to(device)
        return tuple(torch.cat(parts).index_select(0, self.order[device])
                     for parts in zip(*(b.tensors() for b in self.banks)))

    def per_expert(self) -> list[tuple[Tensor, ...]]:
        """Each expert's four tensors, in expert order: slices of :meth:`stacks`, whose gradients flow into them."""
        return list(zip(*(t.unbind(0) for t in self.stacks())))

    def run(self, tensors: Sequence[Tensor], x: Tensor) -> Tensor:
        """One expert, given its four tensors, on the rows ``x``: ``fc2(act(fc1(x)))``."""
        w1, b1, w2, b2 = tensors
        return F.linear(self.act(F.linear(x, w1, b1)), w2, b2)

    def expert(self, e: int) -> tuple[Tensor, ...]:
        """Expert ``e``'s four tensors: views into its bank's (to read or to fill in place)."""
        for bank, ids in zip(self.banks, self.ids):
            if e in ids:
                return tuple(t[ids.index(e)] for t in bank.tensors())
        raise IndexError(f"no expert {e}: this layer holds {self.num_local_experts}")

    def parameters_of(self, ids: Iterable[int]) -> list[nn.Parameter]:
        """The tensors of the banks that hold exactly the experts ``ids`` (:meth:`split` them first)."""
        wanted = set(ids)
        chosen = [bank for bank, held in zip(self.banks, self.ids) if set(held) <= wanted]
        if {e for bank, held in zip(self.banks, self.ids) if bank in chosen for e in held} != wanted:
            raise ValueError(f"experts {sorted(wanted)} are not whole banks of {self.ids}: split() them first")
        return [p for bank in chosen for p in bank.tensors()]

    @torch.no_grad()
    def set_experts(self, tensors: Sequence[Tensor], banks: Sequence[Sequence[int]] | None = None,
                    requires_grad: Sequence[bool] | None = None) -> None:
        """Hold the experts of the stacked ``tensors`` (expert order), in ``banks`` (default: one) with their
        ``requires_grad`` (default: True)."""
        count = len(tensors[0])
        banks = [list(b) for b in (banks or [range(count)])]
        if sorted(e for b in banks for e in b) != list(range(count)) or not all(banks):
            raise ValueError(f"banks {banks} must share out experts 0..{count - 1}, none empty")
        flags = list(requires_grad) if requires_grad is not None else [True] * len(banks)
        device = tensors[0].device
        self.banks = nn.ModuleList([
            Bank([t.index_select(0, torch.tensor(ids, device=device)) for t in tensors], self.group_name, flag)
            for ids, flag in zip(banks, flags)])
        self.ids = banks
        self.order = {}

    def trainable(self) -> list[bool]:
        """Per expert, whether its bank trains (``requires_grad``)."""
        flags = [False] * self.num_local_experts
        for bank, ids in zip(self.banks, self.ids):
            for e in ids:
                flags[e] = bank.fc1_weight.requires_grad
        return flags

    @torch.no_grad()
    def take(self, source: "StackedMlps", first: int) -> None:
        """Hold ``source``'s experts ``first ..`` (as many as this holds), each training as it did there."""
        count = self.num_local_experts
        self.set_experts([t[first:first + count].to(self.banks[0].fc1_weight.device) for t in source.stacks()])
        self.split([e for e, trains in enumerate(source.trainable()[first:first + count]) if trains])

    @torch.no_grad()
    def split(self, trainable: Iterable[int]) -> None:
        """Two banks: the experts ``trainable`` (requires_grad) and the others (frozen); one if either is empty."""
        chosen = sorted(set(trainable))
        rest = [e for e in range(self.num_local_experts) if e not in chosen]
        banks = [b for b in (rest, chosen) if b]
        self.set_experts(self.stacks(), banks, [b is chosen for b in banks])

    def forward(self, dispatched: Tensor) -> Tensor:
        """DeepSpeed's ``Experts`` forward, ``[ep, E, C, d] -> same``: each expert on the C slots every rank sent
        it, as two batched matmuls (:class:`BatchedLinear`)."""
        ep, local, capacity, dim = dispatched.shape
        x = dispatched.transpose(0, 1).reshape(local, ep * capacity, dim)
        w1, b1, w2, b2 = self.stacks()
        out = BatchedLinear.apply(self.act(BatchedLinear.apply(x, w1, b1)), w2, b2)
        return out.view(local, ep, capacity, dim).transpose(0, 1).contiguous()

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for e in range(self.num_local_experts):
            for key, tensor in zip(KEYS, self.expert(e)):
                # a view would save its bank's whole storage: each expert's file holds its own copy
                destination[f"{prefix}deepspeed_experts.{e}.{key}"] = tensor if keep_vars else tensor.detach().clone()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        expected = {f"{prefix}deepspeed_experts.{e}.{key}": (e, i) for e in range(self.num_local_experts)
                    for i, key in enumerate(KEYS)}
        for name, (e, i) in expected.items():
            if name not in state_dict:
                missing_keys.append(name)
                continue
            target, value = self.expert(e)[i], state_dict[name]
            if value.shape != target.shape:
                error_msgs.append(f"size mismatch for {name}: copying a param with shape {tuple(value.shape)} "
                                  f"from checkpoint, the shape in current model is {tuple(target.shape)}.")
                continue
            with torch.no_grad():
                target.copy_(value)
        held = f"{prefix}deepspeed_experts."
        unexpected_keys += [k for k in state_dict if k.startswith(held) and k not in expected]


class BatchedLinear(torch.autograd.Function):
    """``y[e] = x[e] @ W[e]^T + b[e]`` for a rank's E experts in two batched matmuls, on stacked ``W [E, out, in]``
    and ``b [E, out]``: the weight's gradient comes out contiguous, with no transposed copy.
    Apply as ``BatchedLinear.apply(x, weight, bias)``."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        ctx.save_for_backward(x, weight)
        # bmm then add_: baddbmm with a broadcast bias is ~40% slower on CPU
        return torch.bmm(x, weight.transpose(1, 2)).add_(bias.unsqueeze(1))

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        grad_x = torch.bmm(grad, weight) if ctx.needs_input_grad[0] else None
        grad_weight = torch.bmm(grad.transpose(1, 2), x) if ctx.needs_input_grad[1] else None
        return grad_x, grad_weight, grad.sum(1) if ctx.needs_input_grad[2] else None

"""The MoE MLP: DeepSpeed's ``MoE`` with our per-dataset gate, a drop-in for timm's ``Mlp``."""
from __future__ import annotations

import torch
from deepspeed.moe.layer import MoE
from timm.layers import Mlp
from torch import Tensor, nn

from mthl_ds.moe.gate import PerDatasetGate

UPCYCLE_MODES = ("copy", "split")


class MoEMlp(MoE):
    """E expert MLPs ``dim -> hidden -> dim`` behind a :class:`PerDatasetGate`.

    Subclasses DeepSpeed's ``MoE`` because the engine sets up expert-parallel groups, splits parameters and
    writes per-expert checkpoint files only for instances of that class. Unlike ``MoE.forward``, it returns
    one tensor (timm blocks call ``self.mlp(x)``); the gate keeps the losses and counts.

    Args:
        dim: token width (input and output).
        hidden: hidden width of each expert (the paper: dense hidden / K, FLOPs-matched).
        num_experts: experts in the layer over all expert-parallel ranks.
        gate: the layer's gate.
        ep_size: expert-parallel world size; each rank holds ``num_experts // ep_size`` experts.
        act_layer: activation of the experts.
    """

    def __init__(self, dim: int, hidden: int, num_experts: int, gate: PerDatasetGate, ep_size: int = 1,
                 act_layer: type[nn.Module] = nn.GELU):
        if ep_size < 1 or num_experts % ep_size:
            raise ValueError(f"num_experts={num_experts} is not divisible by ep_size={ep_size}")
        if gate.num_experts != num_experts:
            raise ValueError(f"gate routes over {gate.num_experts} experts, layer has {num_experts}")
        super().__init__(hidden_size=dim, expert=Mlp(dim, hidden, act_layer=act_layer), num_experts=num_experts,
                         ep_size=ep_size, k=1)
        self.deepspeed_moe.gate = gate  # replaces DeepSpeed's TopKGate
        self.dim, self.hidden = dim, hidden

    @property
    def gate(self) -> PerDatasetGate:
        return self.deepspeed_moe.gate

    @property
    def local_mlps(self) -> nn.ModuleList:
        """The experts held by this rank, local index order."""
        return self.deepspeed_moe.experts.deepspeed_experts

    def forward(self, x: Tensor) -> Tensor:
        return self.deepspeed_moe(x, None)

    @torch.no_grad()
    def init_weights(self, seed: int, ep_rank: int = 0) -> None:
        """Give every expert its own init, keyed on its *global* index, so the model is the same for any ep_size."""
        for local, mlp in enumerate(self.local_mlps):
            gen = torch.Generator().manual_seed(seed * 1_000_003 + ep_rank * self.num_local_experts + local)
            for fc in (mlp.fc1, mlp.fc2):
                nn.init.trunc_normal_(fc.weight, std=0.02, generator=gen)
                nn.init.zeros_(fc.bias)

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
            raise ValueError(f"upcycle 'split' needs dense hidden {dense_hidden} == expert hidden {self.hidden} x K={top_k}")
        for local, mlp in enumerate(self.local_mlps):
            if mode == "copy":
                rows, scale = slice(None), 1.0
            else:
                chunk = (ep_rank * self.num_local_experts + local) % top_k
                rows, scale = slice(chunk * self.hidden, (chunk + 1) * self.hidden), float(top_k)
            mlp.fc1.weight.copy_(dense.fc1.weight[rows])
            mlp.fc1.bias.copy_(dense.fc1.bias[rows])
            mlp.fc2.weight.copy_(dense.fc2.weight[:, rows] * scale)
            mlp.fc2.bias.copy_(dense.fc2.bias)

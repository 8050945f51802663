"""Backbones: timm Swin / DaViT / ViT whose chosen MLPs are replaced by MoE MLPs after construction.

timm's Swin and DaViT take no ``mlp_layer`` argument (Swin silently swallows unknown kwargs), so
:func:`moeify` swaps ``block.mlp`` in place; ViT blocks would take one, but one mechanism serves all three.
With ``moe.attention`` set, the same ViT blocks also get Mod-Squad's MoE attention. A ViT has one stride
(16): :class:`SimplePyramid` turns four of its block outputs into the strides 4-32 the heads expect. The
model code here is single-device: expert parallelism is only the ``ep_size`` / ``ep_rank`` a caller passes,
and DeepSpeed's engine wires the process groups.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Optional, Sequence, Union

import timm
import torch
import torch.nn.functional as F
from timm.layers import Mlp
from timm.models.vision_transformer import Attention
from torch import Tensor, nn

from mthl_ds.config import MoEConfig
from mthl_ds.geometry import STRIDE
from mthl_ds.models.pretrained import load_dense_checkpoint
from mthl_ds.moe.attention import MoEAttention
from mthl_ds.moe.gate import PerDatasetGate, RoutingContext, compute_mi_weights, fold_usages
from mthl_ds.moe.layer import MoEMlp
from mthl_ds.moe.losses import exact_negative_mi

# name -> (timm constructor kwargs, default MoE placement). The paper: every MLP for T/S, every second for B.
BACKBONES: dict[str, tuple[dict, str]] = {
    "swin_tiny_patch4_window7_224": (dict(model_name="swin_tiny_patch4_window7_224"), "all"),
    "swin_small_patch4_window7_224": (dict(model_name="swin_small_patch4_window7_224"), "all"),
    "swin_base_patch4_window7_224": (dict(model_name="swin_base_patch4_window7_224"), "every_second"),
    "davit_tiny": (dict(model_name="davit_tiny"), "all"),
    "davit_small": (dict(model_name="davit_small"), "all"),
    "davit_base": (dict(model_name="davit_base"), "every_second"),
    # Debug flavours for tests and the demo: the same classes, a few thousand times cheaper.
    "swin_debug": (dict(model_name="swin_tiny_patch4_window7_224", embed_dim=32, depths=(1, 1, 2, 1),
                        num_heads=(1, 2, 4, 8), window_size=4), "all"),
    "davit_debug": (dict(model_name="davit_tiny", embed_dims=(32, 64, 128, 256), depths=(1, 1, 1, 1),
                         num_heads=(1, 2, 4, 8), window_size=4), "all"),
    # AdaMV-MoE's ViTs (Table 2); MoE in every second block, as there.
    "vit_small_patch16_224": (dict(model_name="vit_small_patch16_224"), "every_second"),
    "vit_base_patch16_224": (dict(model_name="vit_base_patch16_224"), "every_second"),
    "vit_debug": (dict(model_name="vit_small_patch16_224", embed_dim=64, depth=4, num_heads=2), "every_second"),
}


def mlp_blocks(net: nn.Module) -> list[nn.Module]:
    """Every module that owns an ``mlp`` (a timm ``Mlp`` or an MoE MLP already put there), in order."""
    return [m for m in net.modules() if isinstance(getattr(m, "mlp", None), (Mlp, MoEMlp))]


def resolve_layers(layers: Union[str, Sequence[int]], count: int) -> tuple[int, ...]:
    """``"all"``, ``"every_second"`` (MLP indices 1, 3, 5, ...), AdaMV-MoE's ``"early"`` / ``"middle"`` /
    ``"later"`` (the first, central or last half of the MLPs) or explicit indices into the MLP list."""
    half = count // 2
    named = {"all": range(count), "every_second": range(1, count, 2), "early": range(half),
             "middle": range((count - half) // 2, (count - half) // 2 + half), "later": range(count - half, count)}
    if isinstance(layers, str) and layers in named:
        return tuple(named[layers])
    if isinstance(layers, str):
        raise ValueError(f"moe layers {layers!r} must be one of {sorted(named)} or a list of MLP indices")
    bad = [i for i in layers if not 0 <= i < count]
    if bad:
        raise ValueError(f"moe layer indices {bad} are outside the backbone's {count} MLPs (0..{count - 1})")
    return tuple(sorted(set(layers)))


def make_gate(dim: int, num_experts: int, top_k: dict[str, int], moe: MoEConfig, context: RoutingContext,
              **overrides) -> PerDatasetGate:
    kwargs = dict(capacity_factor=moe.capacity_factor, eval_capacity_factor=moe.eval_capacity_factor,
                  min_capacity=moe.min_capacity, drop_tokens=moe.drop_tokens, eval_drop_tokens=moe.eval_drop_tokens,
                  renormalize=moe.renormalize,
                  noise_std=moe.noise_std, router_hidden=moe.router_hidden, loss_coefs=moe.losses,
                  mi_momentum=moe.mi_momentum, context=context)
    return PerDatasetGate(dim, num_experts, list(top_k), top_k, **{**kwargs, **overrides})


def moe_attention(net: nn.Module, moe: MoEConfig, datasets: Sequence[str], context: RoutingContext,
                  seed: int = 0) -> list[MoEAttention]:
    """Replace the attention of the blocks ``moe.layers`` names with :class:`MoEAttention` (Mod-Squad)."""
    att = moe.attention
    blocks = mlp_blocks(net)
    layers = []
    for i in resolve_layers(moe.layers, len(blocks)):
        dense = blocks[i].attn
        if not isinstance(dense, Attention):
            raise ValueError(f"block {i}: MoE attention replaces timm's ViT Attention, not {type(dense).__name__}")
        dim = dense.qkv.in_features
        gate = make_gate(dim, att.num_experts, {d: att.top_k for d in datasets}, moe, context, drop_tokens=False,
                         eval_drop_tokens=False, noise_std=0.0, loss_coefs=att.losses)
        layer = MoEAttention(dim, att.num_experts, att.head_dim or dim // att.top_k, gate,
                             qkv_bias=dense.qkv.bias is not None, seed=seed * 1009 + 500 + i)
        blocks[i].attn = layer
        layers.append(layer)
    return layers


def moeify(net: nn.Module, moe: MoEConfig, top_k: dict[str, int], context: RoutingContext,
           ep_size: int = 1, ep_rank: int = 0, seed: int = 0) -> list[MoEMlp]:
    """Replace the chosen timm MLPs of ``net`` with :class:`MoEMlp` layers; returns them in order.

    Each expert's hidden width is the dense hidden width / ``moe.hidden_divisor`` (default: / K).
    """
    blocks = mlp_blocks(net)
    chosen = resolve_layers(moe.layers, len(blocks))
    divisor = moe.hidden_divisor or moe.top_k
    layers = []
    for i in chosen:
        dense: Mlp = blocks[i].mlp
        dim, dense_hidden = dense.fc1.in_features, dense.fc1.out_features
        if dense_hidden % divisor:
            raise ValueError(f"MLP {i}: hidden {dense_hidden} is not divisible by {divisor}")
        gate = make_gate(dim, moe.num_experts, top_k, moe, context,
                         drop_tokens=moe.drop_tokens and moe.dispatch == "capacity")
        layer = MoEMlp(dim, dense_hidden // divisor, moe.num_experts, gate, ep_size=ep_size,
                       act_layer=type(dense.act), dispatch=moe.dispatch)
        if moe.upcycle:
            layer.upcycle(dense, moe.upcycle, moe.top_k, ep_rank=ep_rank)
        else:
            layer.init_weights(seed * 1009 + i, ep_rank=ep_rank)
        blocks[i].mlp = layer
        layers.append(layer)
    return layers


class SimplePyramid(nn.Module):
    """Four block outputs of a plain ViT (all at its patch stride 16) as features at strides 4, 8, 16, 32:
    two 2x transposed convolutions, one, none, and a 2x max-pool (the ViT + UperNet neck of BEiT / MAE)."""

    def __init__(self, dim: int, depth: int):
        super().__init__()
        self.blocks = [round((i + 1) * depth / 4) - 1 for i in range(4)]  # e.g. 2, 5, 8, 11 of 12
        self.up4 = nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, 2), nn.GELU(), nn.ConvTranspose2d(dim, dim, 2, 2))
        self.up2 = nn.ConvTranspose2d(dim, dim, 2, 2)
        self.down2 = nn.MaxPool2d(2, ceil_mode=True)

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        return [self.up4(features[0]), self.up2(features[1]), features[2], self.down2(features[3])]


class MoEBackbone(nn.Module):
    """A timm backbone returning its four stage features (NCHW), with per-dataset routing.

    Call :meth:`set_dataset` before forward. After forward, :meth:`router_loss` sums the weighted router
    losses of every gate (MoE MLPs and MoE attention), and :meth:`update_routing_buffers` folds this
    forward's routing statistics into the MI buffers (one collective for all gates when a ``reduce_mean``
    is given).
    """

    def __init__(self, net: nn.Module, datasets: Sequence[str], moe_layers: Sequence[MoEMlp],
                 context: RoutingContext, attention_layers: Sequence[MoEAttention] = ()):
        super().__init__()
        self.net = net
        self.datasets = list(datasets)
        self.context = context
        self.moe_layers = list(moe_layers)  # also registered inside self.net; this is a view for iteration
        self.attention_layers = list(attention_layers)  # the same: Mod-Squad MoE attention, if any
        self.pyramid = SimplePyramid(net.embed_dim, len(net.blocks)) if is_vit(net) else None
        self.min_side = swin_min_side(net)
        self.stage_channels = [net.embed_dim] * 4 if self.pyramid else [info["num_chs"] for info in net.feature_info]

    @property
    def gates(self) -> list[PerDatasetGate]:
        return [layer.gate for layer in self.moe_layers + self.attention_layers]

    def set_dataset(self, name: str) -> None:
        if name not in self.datasets:
            raise KeyError(f"unknown dataset {name!r}; this model routes {self.datasets}")
        self.context.dataset = name

    def forward(self, x: Tensor) -> list[Tensor]:
        if self.context.dataset is None:
            raise RuntimeError("no dataset set: call model.set_dataset(name) before forward")
        self.context.forward_id += 1
        gates = self.gates
        if self.training and not all(g.mi_weights_current() for g in gates if "mi" in g.loss_coefs):
            compute_mi_weights(gates)  # a buffer changed since the last fold (a loaded checkpoint, surgery)
        if self.min_side is not None:
            x = pad_to_canvas(x, self.min_side)
        if self.pyramid is None:
            return self.net.forward_intermediates(x, intermediates_only=True)
        return self.pyramid(self.net.forward_intermediates(x, indices=self.pyramid.blocks, intermediates_only=True))

    def router_loss(self) -> Tensor | float:
        """Every gate's router losses of this forward, each weighted by its coefficient: one stacked sum per
        coefficient rather than an op per gate (0.0 where there is none)."""
        by_coef: dict[float, list[Tensor]] = {}
        for gate in self.gates:
            for name, value in gate.losses.items():
                by_coef.setdefault(gate.loss_coefs[name], []).append(value)
        weighted = [coef * torch.stack(values).sum() for coef, values in by_coef.items()]
        return sum(weighted[1:], weighted[0]) if weighted else 0.0  # sum() alone would add a Python 0 first

    def router_loss_terms(self) -> dict[str, Tensor]:
        """Unweighted router losses summed over layers (``attention/`` for MoE attention), for logging: detached
        0-dim tensors on the model's device (reading them is the logger's one host sync)."""
        terms: dict[str, list[Tensor]] = {}
        for prefix, layers in (("", self.moe_layers), ("attention/", self.attention_layers)):
            for layer in layers:
                for name, value in layer.gate.losses.items():
                    terms.setdefault(prefix + name, []).append(value.detach())
        return {name: torch.stack(values).sum() for name, values in terms.items()}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's activation checkpointing: blocks (stages for DaViT) are re-run in backward. Each gate records
        its routing once per forward (see ``RoutingContext``), and ``B(D, E)`` moves only after the backward
        (the trainer folds it after the update), so a recomputed block routes and weighs its losses as the first
        run did: the gradients are those of the run without checkpointing."""
        self.net.set_grad_checkpointing(enable)

    def checkpoint_units(self) -> list[nn.Module]:
        """The modules timm's checkpointing re-runs one at a time: Swin's and the ViT's blocks, DaViT's stages."""
        net = self.net
        if hasattr(net, "layers"):
            return [block for layer in net.layers for block in layer.blocks]
        return list(net.stages) if hasattr(net, "stages") else list(net.blocks)

    def routing_mi(self) -> Tensor:
        """MI(D; E) in nats of every gate's running joint ``B(D, E)``, one per gate, on the device (0: experts
        shared alike by all datasets, log M at most: each expert serves one dataset)."""
        if not self.gates:
            return torch.zeros(0)
        return torch.stack([-exact_negative_mi(gate.routing_joint.double()) for gate in self.gates]).clamp(min=0)

    def routes_dropped(self) -> Tensor:
        """Share of the last forward's routes (every gate of this rank) that capacity dropped: 0-dim, on the
        device."""
        gates = [gate for gate in self.gates if gate.counts is not None]
        if not gates:
            return torch.zeros(())
        return sum(gate.dropped() for gate in gates).float() / max(sum(gate.routes for gate in gates), 1)

    def discard_routing_statistics(self) -> None:
        """Forget this forward's routing statistics (a skipped step): the MI buffers stay as they are."""
        for gate in self.gates:
            gate.pending_usage = None

    def update_routing_buffers(self, reduce_mean: Optional[Callable[[Tensor], Tensor]] = None,
                               applied: Optional[Tensor] = None) -> None:
        """Fold this forward's routing into every ``B(D, E)`` (one ``reduce_mean`` for all gates). ``applied``: a
        0-dim bool tensor; where False (a step skipped on the device) the buffers stay as they are."""
        gates = [gate for gate in self.gates if gate.pending_usage is not None]
        if not gates:
            return
        flat = torch.cat([g.pending_usage[1] for g in gates])  # layers may differ in width after pruning
        if reduce_mean is not None:
            flat = reduce_mean(flat)
        fold_usages(gates, [g.pending_usage[0] for g in gates], flat, applied)
        for gate in gates:
            gate.pending_usage = None


def swin_min_side(net: nn.Module) -> Optional[int]:
    """For a timm Swin, the smallest side its last stage takes (a whole window there, :mod:`mthl_ds.geometry`);
    None for the other backbones, which take any size."""
    if not hasattr(net, "layers") or type(net).__name__ != "SwinTransformer":
        return None
    return STRIDE * min(net.layers[-1].blocks[0].window_size)


def pad_to_canvas(x: Tensor, min_side: int) -> Tensor:
    """``x`` padded at the bottom and right with zeros (the mean colour once normalised) to sides that are
    multiples of the total stride and at least ``min_side``: the canvas the pipelines make (800 x 1333 ->
    800 x 1344), so that any input size runs, as mmdet's Swin takes any size."""
    height, width = x.shape[-2:]
    side = lambda s: max(min_side, -(-s // STRIDE) * STRIDE)  # noqa: E731
    if (side(height), side(width)) == (height, width):
        return x
    return F.pad(x, (0, side(width) - width, 0, side(height) - height))


def is_vit(net: nn.Module) -> bool:
    return type(net).__name__ == "VisionTransformer"


def shift_windows_per_input(net: nn.Module) -> None:
    """Decide each Swin block's window shift from the input it gets, as the reference Swin decides it for the
    size it is built for: shift by half a window in every second block, except in a stage no larger than one
    window. timm fixes the shift at build time from ``img_size``: built for 224, the last stage is one 7 x 7
    window, so its blocks would never shift, also on an 800 x 1344 detection canvas (25 x 42 there), where mmdet's
    Swin shifts. Windows (and their relative-position tables) stay as built; masks follow the shift per forward
    (timm's ``dynamic_mask``)."""
    from timm.models.swin_transformer import SwinTransformerBlock

    def choose_shift(block: SwinTransformerBlock, args) -> None:
        height, width = args[0].shape[1:3]
        block.shift_size = tuple(0 if side <= w or not shifts else w // 2 for side, w, shifts
                                 in zip((height, width), block.window_size, block.target_shift_size))

    for block in net.modules():
        if isinstance(block, SwinTransformerBlock):
            block.register_forward_pre_hook(choose_shift)


def create_timm(name: str, img_size: int, drop_path_rate: float = 0.0) -> nn.Module:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose from {sorted(BACKBONES)}")
    kwargs = dict(BACKBONES[name][0])
    model_name = kwargs.pop("model_name")
    if model_name.startswith("swin"):  # one model sees each dataset's input size: masks built per input
        kwargs.update(img_size=img_size, dynamic_img_size=True)
    if model_name.startswith("vit"):  # position embeddings resized per input; sizes padded to the patch
        kwargs.update(img_size=img_size, dynamic_img_size=True, dynamic_img_pad=True)
    net = timm.create_model(model_name, pretrained=False, num_classes=0, drop_path_rate=drop_path_rate, **kwargs)
    if model_name.startswith("swin"):
        shift_windows_per_input(net)
    return net


def build_backbone(name: str, datasets: Iterable[str], moe: Optional[MoEConfig], top_k: Optional[dict] = None,
                   img_size: int = 224, drop_path_rate: float = 0.0, ep_size: int = 1, ep_rank: int = 0,
                   seed: int = 0, init_from: Optional[str] = None) -> MoEBackbone:
    """Build a backbone: MTHL when ``moe`` is given, its dense twin MTHL.D when ``moe`` is None.

    Args:
        name: a key of :data:`BACKBONES`.
        datasets: dataset names; one router per dataset in every MoE layer.
        moe: MoE settings; ``moe.layers == "paper"`` takes the backbone's placement from :data:`BACKBONES`.
        top_k: K per dataset; default ``moe.top_k`` for all.
        img_size: input size the backbone is built for.
        ep_size, ep_rank: expert-parallel size and this rank's index in its expert-parallel group.
        seed: seeds the whole init (timm's and the experts'), so every rank builds the same model.
        init_from: a timm checkpoint of the dense backbone, loaded before the MLPs become MoE layers (the
            experts are then upcycled from it when ``moe.upcycle`` is set).
    """
    datasets = list(datasets)
    torch.manual_seed(seed)
    net = create_timm(name, img_size, drop_path_rate)
    if init_from is not None:
        load_dense_checkpoint(net, init_from)
    context = RoutingContext()
    layers: list[MoEMlp] = []
    attention: list[MoEAttention] = []
    if moe is not None:
        if moe.layers == "paper":
            moe = dataclasses.replace(moe, layers=BACKBONES[name][1])
        top_k = top_k or {d: moe.top_k for d in datasets}
        if moe.attention is not None:
            attention = moe_attention(net, moe, datasets, context, seed=seed)
        layers = moeify(net, moe, top_k, context, ep_size=ep_size, ep_rank=ep_rank, seed=seed)
    return MoEBackbone(net, datasets, layers, context, attention)

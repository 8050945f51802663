"""Pretrained dense weights for the backbone: a timm checkpoint loaded before the MLPs become MoE layers.

The file is adapted by timm's own ``checkpoint_filter_fn`` for that model (Swin's relative-position tables and
patch embedding resized, original Swin/DaViT/ViT layouts renamed, ViT position embeddings resampled), as
``timm.create_model(pretrained=True)`` would; the classifier is dropped (the heads are the tasks'). The experts are
then upcycled from the loaded MLPs by ``model.moe.upcycle`` (see :meth:`MoEMlp.upcycle`).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from mthl_ds.config import ConfigError


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"model.init_from: {path} does not exist") from None
    except Exception as e:  # not a torch file, a truncated one, pickled code
        raise ConfigError(f"model.init_from: {path} is not a torch checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict):
        raise ConfigError(f"model.init_from: {path} holds a {type(state).__name__}, not a state dict")
    return state


def short(keys: list[str], limit: int = 6) -> str:
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


@torch.no_grad()
def load_dense_checkpoint(net: nn.Module, path: str | Path) -> None:
    """Load a timm checkpoint of ``net``'s architecture into ``net`` (a headless timm model), strictly."""
    path = Path(path)
    state = read_state_dict(path)
    timm_module = sys.modules[type(net).__module__]
    filter_fn = getattr(timm_module, "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state = filter_fn(state, net)
    classifier = net.pretrained_cfg.get("classifier") or "head"
    state = {k: v for k, v in state.items() if not k.startswith(classifier + ".") and not k.startswith("head.fc.")}
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong_shape = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
                   if k in state and state[k].shape != own[k].shape]
    problems = [f"{label}: {short(keys)}" for label, keys in
                (("missing", missing), ("unexpected", unexpected), ("shape (file vs model)", wrong_shape)) if keys]
    if problems:
        raise ConfigError(f"model.init_from: {path} is not a checkpoint of {type(net).__name__} "
                              f"({net.pretrained_cfg.get('architecture', '?')}): " + "; ".join(problems))
    net.load_state_dict(state, strict=True)

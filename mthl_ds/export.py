"""Export: a DeepSpeed checkpoint (any ep_size, ZeRO stage 0/1/2, fp32/fp16/bf16) consolidated into one
portable safetensors file, and loading it back with no distributed set-up.

The file holds every weight of the single-device model (ep_size 1, float32) under the names that model's
``state_dict`` uses, and one JSON metadata entry (``mthl_ds``) with what rebuilds it (nanoGPT: a checkpoint
carries the model's arguments): the recipe the model was first built from, the surgery rules applied since,
and a description a person can read (MoE layers, experts per layer, K and routers per dataset, heads, source).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mthl_ds import surgery
from mthl_ds.config import ConfigError, Recipe, _coerce, validate
from mthl_ds.models.mthl import MTHLModel, build_model

FORMAT = "mthl-ds-export/1"
METADATA_KEY = "mthl_ds"


class ExportError(ValueError):
    """A file or checkpoint that cannot be exported or loaded; the message names it and what is wrong."""


# ------------------------------------------------------------------------------------------- DeepSpeed -> file

def checkpoint_state(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every weight of one DeepSpeed checkpoint folder under the single-device names: the non-expert module state
    (``mp_rank_00_model_states.pt``) plus one file per expert, whose keys DeepSpeed already writes with the
    expert's *global* index. Floating tensors become float32 (exact from fp16 / bf16)."""
    main = ckpt / "mp_rank_00_model_states.pt"
    if not main.is_file():
        raise ExportError(f"{ckpt} holds no DeepSpeed model states ({main.name} is missing)")
    state = dict(torch.load(main, map_location="cpu", weights_only=False)["module"])
    for path in sorted(ckpt.glob("layer_*_expert_*_mp_rank_00_model_states.pt")):
        state.update(torch.load(path, map_location="cpu", weights_only=False))
    return {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in state.items()}


def consolidate(run_dir: Path, tag: Optional[str] = None) -> tuple[MTHLModel, dict]:
    """(single-device model, source description) of a run's checkpoint: ``tag``, or the latest complete one."""
    from mthl_ds.train import POINTER, latest_complete
    ckpt_dir = Path(run_dir) / "checkpoints"
    tag = tag or latest_complete(ckpt_dir)
    if tag is None:
        raise ExportError(f"{run_dir} has no complete checkpoint ({ckpt_dir / POINTER} is missing)")
    run_file = ckpt_dir / tag / "run.json"
    if not run_file.is_file():
        raise ExportError(f"{ckpt_dir / tag} is not a complete checkpoint ({run_file.name} is missing)")
    run = json.loads(run_file.read_text())
    recipe = run["recipe"]
    source = {"run": str(Path(run_dir).resolve()), "tag": tag, "step": run["step"], "world_size": run["world_size"],
              "ep_size": recipe["train"]["ep_size"], "ds_config": recipe["train"]["ds_config"]}
    model = build_from(run["model"], str(run_file))
    state = checkpoint_state(ckpt_dir / tag)
    check_state(model, state, str(ckpt_dir / tag))
    model.load_state_dict(state, strict=True)
    return model, source


# ---------------------------------------------------------------------------------------------- the file

def describe(model: MTHLModel) -> dict:
    """The readable part of the metadata: what a person (or a check on load) wants to know about the model."""
    layers = model.backbone.moe_layers
    return {"backbone": model.built_from["model"]["backbone"],
            "datasets": {name: {"task": task, "top_k": layers[0].gate.top_k[name] if layers else None}
                         for name, task in model.tasks.items()},
            "moe_layers": len(layers),
            "experts_per_layer": [layer.num_experts for layer in layers],
            "routers": sorted(layers[0].gate.routers) if layers else [],
            "routing_rows": list(layers[0].gate.datasets) if layers else [],
            "heads": sorted(model.heads),
            "adapters": any(layer.adapter is not None for layer in layers),
            "parameters": sum(p.numel() for p in model.parameters())}


def save_export(path: Path, model: MTHLModel, source: dict) -> Path:
    """Write ``model`` (single-device) with its metadata; the file appears only once complete."""
    path = Path(path)
    meta = {"format": FORMAT, "built_from": model.built_from, "surgery": model.surgery, "source": source,
            "model": describe(model)}
    # one fresh, contiguous float32 copy per tensor (safetensors refuses tensors that share storage)
    state = {k: (v.detach().float() if v.is_floating_point() else v.detach()).clone(memory_format=torch.contiguous_format)
             for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(state, str(tmp), metadata={METADATA_KEY: json.dumps(meta)})
    os.replace(tmp, path)
    return path


def export_run(run_dir: Path, out: Path, tag: Optional[str] = None) -> Path:
    model, source = consolidate(run_dir, tag)
    return save_export(out, model, source)


def read_metadata(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
    except (SafetensorError, OSError) as e:
        raise ExportError(f"{path}: not a readable safetensors file ({e}); is it truncated?") from None
    if raw is None:
        raise ExportError(f"{path}: a safetensors file without mthl-ds metadata; not an mthl-ds export")
    meta = json.loads(raw)
    if meta.get("format") != FORMAT:
        raise ExportError(f"{path}: format {meta.get('format')!r}, this version reads {FORMAT!r}")
    return meta


def source_recipe(meta: dict, where: str) -> Recipe:
    """The recipe the exported model was first built from."""
    try:
        recipe = _coerce(dict(meta["built_from"]), Recipe, "")
        validate(recipe)
    except ConfigError as e:
        raise ExportError(f"{where}: the recipe in the metadata is not usable: {e}") from None
    return recipe


def build_from(meta: dict, where: str) -> MTHLModel:
    """The single-device model ``meta`` (``built_from`` + ``surgery``) describes, freshly initialised."""
    return surgery.apply(build_model(source_recipe(meta, where)), meta["surgery"])


def check_state(model: MTHLModel, state: dict, where: str) -> None:
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise ExportError(f"{where}: weights do not match the model its metadata describes: missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}, wrong shape {wrong[:3]}")


def load_model(path: Path) -> tuple[MTHLModel, str]:
    """(single-device model, short label) from an export file, a run folder (its latest complete checkpoint) or a
    checkpoint folder ``RUN/checkpoints/TAG``."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        model, source = consolidate(path)
        return model, f"{path.name}/{source['tag']}"
    if path.is_dir():
        if path.parent.name != "checkpoints":
            raise ExportError(f"{path}: neither an export file, a run folder nor RUN/checkpoints/TAG")
        return consolidate(path.parents[1], path.name)[0], f"{path.parents[1].name}/{path.name}"
    return load_export(path)[0], path.stem


def load_export(path: Path, ep_size: int = 1, ep_rank: int = 0) -> tuple[MTHLModel, dict]:
    """(model, metadata). ``ep_size > 1``: this rank's share of the experts, for a DeepSpeed run."""
    meta = read_metadata(path)
    model = build_from(meta, str(path))
    try:
        from safetensors.torch import load_file
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ExportError(f"{path}: the weights cannot be read ({e}); is the file truncated?") from None
    check_state(model, state, str(path))
    model.load_state_dict(state, strict=True)
    return surgery.shard_experts(model, ep_size, ep_rank), meta

"""Export: a DeepSpeed checkpoint (any ep_size, ZeRO stage 0/1/2, fp32/fp16/bf16) consolidated into one
portable safetensors file, and loading it back with no distributed set-up.

The file holds every weight of the single-device model (ep_size 1, float32) under the names that model's
``state_dict`` uses, and one JSON metadata entry (``mthl_ds``) with what rebuilds it (nanoGPT: a checkpoint
carries the model's arguments): the recipe the model was first built from, the surgery rules applied since,
each dataset's inputs (task, input size, class names: what evaluate and predict need), and a description a person
can read (MoE layers, experts per layer, K and routers per dataset, heads, source), and the xxh3-64 checksum
of the tensors' bytes, which loading checks: a damaged file is refused, naming it. Checkpoints themselves, and
their consolidation into the single-device model, are ``mthl_ds.artifacts.checkpoint``'s.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional

import torch
import xxhash
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mthl_ds.artifacts import surgery
from mthl_ds.artifacts.checkpoint import check_state, consolidate, run_recipe
from mthl_ds.errors import ExportError
from mthl_ds.models.counting import count_parameters
from mthl_ds.models.mthl import MTHLModel

FORMAT = "mthl-ds-export/1"
METADATA_KEY = "mthl_ds"
log = logging.getLogger(__name__)


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
            "parameters": count_parameters(model)}


def dataset_inputs(recipe: dict) -> dict[str, dict]:
    """What evaluating and predicting need of each dataset of a run's recipe (as a dict): task, classes (from its
    shard index, if the shards are still where the run read them; else None), input size and eval batch size."""
    out = {}
    for name, d in recipe["datasets"].items():
        folder = Path(d.get("shards") or name)
        folder = folder if folder.is_absolute() else Path(recipe["train"]["data_root"]) / folder
        classes = None
        for split in ("train", "val"):
            index = folder / split / "index.json"
            if index.is_file():
                data = json.loads(index.read_text())
                classes = data.get("class_names") or data.get("classes")
                break
        out[name] = {"task": d["task"], "num_classes": d["num_classes"], "size": list(d["size"]),
                     "eval_batch_size": d.get("eval_batch_size") or d["batch_size"], "classes": classes}
    return out


def tensors_checksum(state: dict[str, torch.Tensor]) -> str:
    """xxh3-64 of the tensors' bytes, in name order: what an export's metadata carries (``checksum``) and
    :func:`load_export` checks."""
    h = xxhash.xxh3_64()
    for name in sorted(state):
        h.update(state[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def save_export(path: Path, model: MTHLModel, source: dict, recipe: Optional[dict] = None) -> Path:
    """Write ``model`` (single-device) with its metadata; the file appears only once complete. ``recipe``: the
    run's recipe (as a dict), whose datasets give each head's input size and class names."""
    path = Path(path)
    meta = {"format": FORMAT, "built_from": model.built_from, "surgery": model.surgery, "source": source,
            "model": describe(model), "datasets": dataset_inputs(recipe) if recipe else {}}
    # one fresh, contiguous float32 copy per tensor (safetensors refuses tensors that share storage)
    state = {k: (v.detach().float() if v.is_floating_point() else v.detach())
             .clone(memory_format=torch.contiguous_format) for k, v in model.state_dict().items()}
    meta["checksum"] = {"algorithm": "xxh3_64", "tensors": tensors_checksum(state)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(state, str(tmp), metadata={METADATA_KEY: json.dumps(meta)})
    os.replace(tmp, path)
    return path


def export_run(run_dir: Path, out: Path, tag: Optional[str] = None) -> Path:
    model, source = consolidate(run_dir, tag)
    return save_export(out, model, source, run_recipe(run_dir, source["tag"]))


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


def load_model(path: Path) -> tuple[MTHLModel, str, dict[str, dict]]:
    """(single-device model, short label, each dataset's inputs: ``dataset_inputs``) from an export file, a run
    folder (its latest complete checkpoint) or a checkpoint folder ``RUN/checkpoints/TAG``, always on the CPU
    (whatever device wrote it): callers move it to the device they compute on (``Predictor.load``,
    ``run_evaluate``, ``mthl-ds stats``)."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        model, source = consolidate(path)
        return model, f"{path.name}/{source['tag']}", dataset_inputs(run_recipe(path, source["tag"]))
    if path.is_dir():
        if path.parent.name != "checkpoints":
            raise ExportError(f"{path}: neither an export file, a run folder nor RUN/checkpoints/TAG")
        run_dir = path.parents[1]
        model = consolidate(run_dir, path.name)[0]
        return model, f"{run_dir.name}/{path.name}", dataset_inputs(run_recipe(run_dir, path.name))
    model, meta = load_export(path)
    return model, path.stem, meta.get("datasets") or dataset_inputs(meta["built_from"])


def load_export(path: Path, ep_size: int = 1, ep_rank: int = 0) -> tuple[MTHLModel, dict]:
    """(model, metadata), on the CPU. ``ep_size > 1``: this rank's share of the experts, for a DeepSpeed run."""
    meta = read_metadata(path)
    model = surgery.rebuild(meta, str(path))
    try:
        from safetensors.torch import load_file
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as e:
        raise ExportError(f"{path}: the weights cannot be read ({e}); is the file truncated?") from None
    expected = (meta.get("checksum") or {}).get("tensors")
    if expected is None:
        log.warning("%s carries no checksum (exported before exports had one): loading it unverified", path)
    elif (found := tensors_checksum(state)) != expected:
        raise ExportError(f"{path}: damaged: its weights do not match the checksum it was written with (xxh3_64 "
                          f"{expected}, found {found}); export it again from its run")
    check_state(model, state, str(path))
    model.load_state_dict(state, strict=True)
    return surgery.shard_experts(model, ep_size, ep_rank), meta

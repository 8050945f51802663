"""Training checkpoints: one home for saving, loading, the ``latest_complete`` pointer, the checks before a
resume, and consolidation into the single-device model (what export, stats, evaluate and predict read).

A checkpoint is a folder ``RUN/checkpoints/stepNNNNNNNN`` holding DeepSpeed's files (the non-expert states,
one file per expert, optimizer shards per rank), each rank's own state (``rankR_state.pt``: loader positions,
RNG states, usage counters, AES) and, written last by rank 0 once every rank is done, ``run.json`` (step, world
size, the recipe, the model's ``built_from`` and ``surgery``). Only then does the pointer move, atomically, so
a run killed while saving resumes from the previous complete checkpoint.
"""
from __future__ import annotations

import dataclasses
import os
import random
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from mthl_ds.artifacts import surgery
from mthl_ds.config import ConfigError, Recipe, recipe_to_dict
from mthl_ds.errors import CheckpointError, ExportError
from mthl_ds.models.mthl import MTHLModel
from mthl_ds.runfiles import RUN_RECORD, read_run_record, write_run_record

POINTER = "latest_complete"


def tag_of(step: int) -> str:
    return f"step{step:08d}"


# ------------------------------------------------------------------------------------------- resume checks

def model_signature(recipe: Recipe) -> dict:
    """What must not change when a run resumes: the model and each dataset's task and classes."""
    return {"model": dataclasses.asdict(recipe.model),
            "datasets": {n: {"task": d.task, "num_classes": d.num_classes, "top_k": d.top_k}
                         for n, d in recipe.datasets.items()},
            "adapt": dataclasses.asdict(recipe.adapt) if recipe.adapt else None}


def diff(saved, current, prefix="") -> list[str]:
    if isinstance(saved, dict) and isinstance(current, dict):
        return [d for k in sorted(set(saved) | set(current))
                for d in diff(saved.get(k), current.get(k), f"{prefix}.{k}" if prefix else k)]
    saved = list(saved) if isinstance(saved, tuple) else saved
    current = list(current) if isinstance(current, tuple) else current
    return [] if saved == current else [f"{prefix}: checkpoint has {saved!r}, recipe has {current!r}"]


def latest_complete(ckpt_dir: Path) -> Optional[str]:
    pointer = ckpt_dir / POINTER
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    if not (ckpt_dir / tag / RUN_RECORD).is_file():
        raise CheckpointError(f"{pointer} names {tag!r} but {ckpt_dir / tag} is not a complete checkpoint")
    return tag


def check_resume(ckpt_dir: Path, recipe: Recipe) -> Optional[str]:
    """The tag a run folder resumes from (None: a fresh run); refuses a checkpoint of another model."""
    tag = latest_complete(ckpt_dir)
    if tag is None:
        return None
    saved = read_run_record(ckpt_dir / tag)
    problems = diff(saved["signature"], model_signature(recipe))
    if problems:
        raise ConfigError(f"{ckpt_dir / tag} was written by a different model; refusing to resume:\n  "
                          + "\n  ".join(problems))
    return tag


def rng_state() -> dict:
    """This rank's RNG states: CPU, numpy, Python and its own CUDA device's (each rank saves its own file)."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    """Restore :func:`rng_state`'s states; the CUDA one goes to this rank's current device. A checkpoint written
    without CUDA restores the rest (the CUDA generator then starts from its seed)."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    cuda = state.get("cuda")
    if isinstance(cuda, list):  # written by an earlier version: every device's state; this rank's is its own index
        cuda = cuda[torch.cuda.current_device()] if torch.cuda.is_available() and cuda else None
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)


# ------------------------------------------------------------------------------------------- save and load

def save(engine, ckpt_dir: Path, step: int, recipe: Recipe, model: MTHLModel, rank_state: dict, rank: int,
         world_size: int, barrier) -> str:
    """Every rank writes its part; rank 0 then records the checkpoint, moves the pointer and keeps the newest
    ``train.keep_checkpoints``. ``barrier`` synchronises the ranks (a no-op in one process)."""
    tag = tag_of(step)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step}, save_latest=False)
    (ckpt_dir / tag).mkdir(parents=True, exist_ok=True)
    torch.save({**rank_state, "rng": rng_state()}, ckpt_dir / tag / f"rank{rank}_state.pt")
    barrier()
    if rank == 0:  # the checkpoint is complete: record it, then move the pointer atomically
        write_run_record(ckpt_dir / tag, {
            "step": step, "world_size": world_size, "signature": model_signature(recipe),
            "recipe": recipe_to_dict(recipe), "model": {"built_from": model.built_from, "surgery": model.surgery}})
        tmp = ckpt_dir / f".{POINTER}.tmp"
        tmp.write_text(tag + "\n")
        os.replace(tmp, ckpt_dir / POINTER)
        tags = sorted(p.name for p in ckpt_dir.glob("step*") if p.is_dir())
        for old in tags[:-recipe.train.keep_checkpoints]:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    barrier()
    return tag


def rank_state(ckpt_dir: Path, tag: str, rank: int, world_size: int) -> dict:
    """This rank's saved state (loader positions, RNG states, routing usage), which needs no engine to read;
    the world size is checked first, as exact resume needs the same one."""
    saved = read_run_record(ckpt_dir / tag)
    if saved["world_size"] != world_size:
        raise ConfigError(f"{ckpt_dir / tag} was written by {saved['world_size']} ranks; this run has "
                          f"{world_size}: exact resume needs the same world size")
    return torch.load(ckpt_dir / tag / f"rank{rank}_state.pt", map_location="cpu", weights_only=False)


def load(engine, ckpt_dir: Path, tag: str, model: MTHLModel, state: dict) -> int:
    """Restore the engine, this rank's RNG states (``state``: its :func:`rank_state`) and the surgery done during
    training (AES's ``set_top_k``); returns the step."""
    saved = read_run_record(ckpt_dir / tag)
    path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise CheckpointError(f"DeepSpeed found no checkpoint {tag!r} in {ckpt_dir}")
    set_rng_state(state["rng"])
    # K set during training (AES) is not in the weights: replay the checkpoint's rules the new model lacks
    later = saved["model"]["surgery"][len(model.surgery):]
    if any(rule["op"] != "set_top_k" for rule in later):
        raise ConfigError(f"{ckpt_dir / tag}: surgery during training other than set_top_k: {later}")
    surgery.apply(model, later)
    return client["step"]


# ------------------------------------------------------------------------------------ the single-device model

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


def check_state(model: MTHLModel, state: dict, where: str) -> None:
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise ExportError(f"{where}: weights do not match the model its metadata describes: missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}, wrong shape {wrong[:3]}")


def consolidate(run_dir: Path, tag: Optional[str] = None) -> tuple[MTHLModel, dict]:
    """(single-device model, source description) of a run's checkpoint: ``tag``, or the latest complete one, for
    any ep_size, ZeRO stage and precision it was trained with."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    tag = tag or latest_complete(ckpt_dir)
    if tag is None:
        raise ExportError(f"{run_dir} has no complete checkpoint ({ckpt_dir / POINTER} is missing)")
    run_file = ckpt_dir / tag / RUN_RECORD
    if not run_file.is_file():
        raise ExportError(f"{ckpt_dir / tag} is not a complete checkpoint ({run_file.name} is missing)")
    run = read_run_record(ckpt_dir / tag)
    recipe = run["recipe"]
    source = {"run": str(Path(run_dir).resolve()), "tag": tag, "step": run["step"], "world_size": run["world_size"],
              "ep_size": recipe["train"]["ep_size"], "ds_config": recipe["train"]["ds_config"]}
    model = surgery.rebuild(run["model"], str(run_file))
    state = checkpoint_state(ckpt_dir / tag)
    check_state(model, state, str(ckpt_dir / tag))
    model.load_state_dict(state, strict=True)
    return model, source


def run_recipe(run_dir: Path, tag: Optional[str] = None) -> dict:
    """The recipe (as a dict) a run's checkpoint was trained with."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    tag = tag or latest_complete(ckpt_dir)
    return read_run_record(ckpt_dir / tag)["recipe"]

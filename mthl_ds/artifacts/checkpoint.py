"""Training checkpoints: one home for saving, loading, the ``latest_complete`` pointer, the checks before a
resume, and consolidation into the single-device model (what export, stats, evaluate and predict read).

A checkpoint is a folder ``RUN/checkpoints/stepNNNNNNNN`` holding DeepSpeed's files (the non-expert states,
one file per expert, optimizer shards per rank), each rank's own state (``rankR_state.pt``: loader positions,
RNG states, usage counters, AES) and, written by rank 0 once every rank is done, ``run.json`` (step, world
size, the recipe, the model's ``built_from`` and ``surgery``) and ``manifest.json`` (every file's size and
checksum, :mod:`mthl_ds.artifacts.manifest`; the ranks share the reading). Only then does the pointer move,
atomically, so a run killed while saving resumes from the previous complete checkpoint.

Reads are verified against the manifest first. A resume whose checkpoint is damaged (a file missing, truncated or
changed) falls back to the newest earlier checkpoint that verifies, moves the damaged one to
``checkpoints/damaged/`` (never deleting it) and says so; export and the other readers refuse a damaged checkpoint
and name the newest step that verifies. A save that cannot write (a full disk, any OSError) leaves the previous
checkpoint and the pointer as they were, removes its partial folder and stops every rank with
:class:`CheckpointSaveError`. A checkpoint written before manifests existed still loads, with a warning.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import random
import re
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from mthl_ds.artifacts import manifest, surgery
from mthl_ds.config import ConfigError, Recipe, recipe_to_dict
from mthl_ds.errors import CheckpointError, ExportError
from mthl_ds.models.mthl import MTHLModel
from mthl_ds.runfiles import RUN_RECORD, read_run_record, write_run_record
from mthl_ds.runtime.collectives import all_gather_objects, barrier, world

POINTER = "latest_complete"
DAMAGED = "damaged"  # checkpoints/damaged/<tag>: where a resume moves a checkpoint that does not verify
TAG = re.compile(r"step\d{8}")
log = logging.getLogger(__name__)


class CheckpointSaveError(CheckpointError):
    """A checkpoint could not be written (a full disk, an I/O error); the previous one is intact."""


def tag_of(step: int) -> str:
    return f"step{step:08d}"


def complete_tags(ckpt_dir: Path) -> list[str]:
    """The complete checkpoints of a run (a ``run.json`` written), oldest first."""
    return sorted(p.name for p in Path(ckpt_dir).iterdir() if TAG.fullmatch(p.name) and (p / RUN_RECORD).is_file()) \
        if Path(ckpt_dir).is_dir() else []


# ------------------------------------------------------------------------------------------- verification

def problems_of(folder: Path, share: tuple[int, int] = (0, 1)) -> Optional[list[str]]:
    """What is wrong with a checkpoint folder against its manifest (empty: it verifies; None: it has no manifest,
    being written before manifests). ``share``: (rank, ranks), each rank reading its share of the files."""
    found = manifest.read(folder)
    if found is None:
        try:
            recorded = read_run_record(folder).get("manifest")
        except (OSError, ValueError):
            recorded = None
        return [f"{manifest.MANIFEST}: missing ({RUN_RECORD} says one was written)"] if recorded else None
    return [str(p) for p in manifest.verify(folder, found, share)]


def verify_everywhere(folder: Path) -> Optional[list[str]]:
    """:func:`problems_of` with every rank reading its share of the files; every rank gets every rank's problems,
    so that they agree."""
    folder = Path(folder)
    if not (folder / manifest.MANIFEST).is_file() and not (folder / RUN_RECORD).is_file():
        return [f"{folder.name}: neither {manifest.MANIFEST} nor {RUN_RECORD}: not a complete checkpoint"]
    mine = problems_of(folder, world())
    everyone = all_gather_objects(mine)
    return None if any(p is None for p in everyone) else sorted(p for part in everyone for p in part)


def describe_problems(folder: Path, problems: list[str]) -> str:
    shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
    return f"{folder} does not verify against its {manifest.MANIFEST}: {shown}"


def newest_good(ckpt_dir: Path, before: Optional[str] = None) -> Optional[str]:
    """The newest complete checkpoint (older than ``before``, if given) that verifies, or has no manifest."""
    for tag in reversed(complete_tags(ckpt_dir)):
        if before is not None and tag >= before:
            continue
        if not problems_of(Path(ckpt_dir) / tag):
            return tag
    return None


# ------------------------------------------------------------------------------------------- resume checks

def model_signature(recipe: Recipe) -> dict:
    """What must not change when a run resumes: the model and each dataset's task and classes, and how the
    experts' weights are laid out in parameters (the order of ZeRO's flat optimizer states follows it: a
    checkpoint from before the experts were stacked per layer cannot resume)."""
    return {"expert_tensors": "stacked per MoE layer", "model": dataclasses.asdict(recipe.model),
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


def pointed_tag(ckpt_dir: Path) -> Optional[str]:
    """The tag the pointer names, whatever state its folder is in (None: no pointer, a fresh run)."""
    pointer = Path(ckpt_dir) / POINTER
    return pointer.read_text().strip() if pointer.is_file() else None


def check_resume(ckpt_dir: Path, recipe: Recipe, tag: Optional[str] = None) -> Optional[str]:
    """Refuse to resume ``tag`` (default: the pointer's) when it was written by another model; returns the tag
    (None: a fresh run). Checked before any process group exists; a ``run.json`` that cannot be read is left to
    :func:`resume_tag`, which verifies the checkpoint and falls back."""
    tag = tag or pointed_tag(ckpt_dir)
    if tag is None:
        return None
    try:
        saved = read_run_record(ckpt_dir / tag)
    except (OSError, ValueError):
        return tag
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

WRITE_ERRORS = (OSError, RuntimeError)  # torch.save reports a failed write as a RuntimeError of its zip writer


def write_failure(path: Path, error: Exception) -> str:
    """A failed write in words; torch's zip writer does not say why, so a full filesystem is named as such."""
    why = str(error).strip().splitlines()[0]
    if not isinstance(error, OSError) and shutil.disk_usage(Path(path).parent).free < 2 ** 20:
        why = f"No space left on device (torch: {why})"
    return f"{path}: {why}"


@contextmanager
def caught_write_errors(engine, failures: list):
    """While DeepSpeed saves, a file write that fails (ENOSPC, EIO, ...: :data:`WRITE_ERRORS`) is recorded in
    ``failures`` and its partial file removed instead of raising: DeepSpeed's save has barriers, and a rank that
    left it early would leave the others waiting. After the first failure this rank writes nothing more."""
    ckpt_engine = engine.checkpoint_engine
    write = ckpt_engine.save

    def save(state_dict, path):
        if failures:
            return
        try:
            write(state_dict, path)
        except WRITE_ERRORS as e:
            failures.append(write_failure(path, e))
            Path(path).unlink(missing_ok=True)

    ckpt_engine.save = save
    try:
        yield
    finally:
        del ckpt_engine.save  # the method again


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file()) if Path(folder).is_dir() else 0


def mount_point(path: Path) -> Path:
    path = Path(path).resolve()
    while not os.path.ismount(path):
        path = path.parent
    return path


def save_failed(ckpt_dir: Path, tag: str, failures: list[str]) -> str:
    """What to say when a save failed: the files, the filesystem, its free space and what a checkpoint needs."""
    previous = latest_complete(ckpt_dir)
    needed = folder_bytes(ckpt_dir / previous) if previous else 0
    free = shutil.disk_usage(ckpt_dir).free
    return (f"checkpoint {tag} not saved: {'; '.join(failures[:3])}; filesystem {mount_point(ckpt_dir)} has "
            f"{free} bytes free" + (f", a checkpoint of this run takes {needed} bytes ({previous})" if needed else "")
            + f"; {ckpt_dir / POINTER} still names {previous or 'no checkpoint'}, which is untouched")


def save(engine, ckpt_dir: Path, step: int, recipe: Recipe, model: MTHLModel, rank_state: dict, rank: int,
         world_size: int) -> str:
    """Every rank writes its part and checksums its share of the step's files; rank 0 then writes ``run.json``
    and the manifest, moves the pointer and keeps the newest ``train.keep_checkpoints`` (never the one the pointer
    names). A failed write on any rank: every rank raises :class:`CheckpointSaveError` with the same message once
    rank 0 has removed the partial folder."""
    tag, folder = tag_of(step), ckpt_dir / tag_of(step)
    failures: list[str] = []
    with caught_write_errors(engine, failures):
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step}, save_latest=False)
    if not failures:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            torch.save({**rank_state, "rng": rng_state()}, folder / f"rank{rank}_state.pt")
        except WRITE_ERRORS as e:
            failures.append(write_failure(folder / f"rank{rank}_state.pt", e))
    failures = [f for part in all_gather_objects(failures) for f in part]
    if failures:
        if rank == 0:
            shutil.rmtree(folder, ignore_errors=True)
        message = save_failed(ckpt_dir, tag, failures) if rank == 0 else ""
        raise CheckpointSaveError(all_gather_objects(message)[0])
    files = manifest.step_files(folder)  # every rank sees every rank's files: the run folder is shared
    digests = manifest.describe(folder, files[rank::world_size])
    everyone = all_gather_objects(digests)
    if rank == 0:  # the checkpoint is complete: record it, then move the pointer atomically
        write_run_record(folder, {
            "step": step, "world_size": world_size, "manifest": manifest.MANIFEST, "signature": model_signature(recipe),
            "recipe": recipe_to_dict(recipe), "model": {"built_from": model.built_from, "surgery": model.surgery}})
        entries = {name: d for part in everyone for name, d in part.items()}
        entries[RUN_RECORD] = manifest.digest(folder / RUN_RECORD)
        manifest.write(folder, entries, step)
        tmp = ckpt_dir / f".{POINTER}.tmp"
        tmp.write_text(tag + "\n")
        os.replace(tmp, ckpt_dir / POINTER)
        for old in complete_tags(ckpt_dir)[:-recipe.train.keep_checkpoints]:
            if old != tag:
                shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    barrier()
    return tag


def resume_tag(ckpt_dir: Path, rank: int) -> tuple[Optional[str], list[dict]]:
    """The checkpoint a run resumes from, verified by every rank (each reads its share of the files, and the
    ranks agree), and the damaged ones passed over: ``[{"tag", "problems"}]``, newest first. A damaged checkpoint
    is moved to ``checkpoints/damaged/`` by rank 0 (never deleted) and the pointer set to the one resumed from.
    A checkpoint without a manifest (written before manifests) is taken as it is, with a warning."""
    tag = pointed_tag(ckpt_dir)
    skipped: list[dict] = []
    while tag is not None:
        problems = verify_everywhere(ckpt_dir / tag)
        if problems is None:
            if rank == 0:
                log.warning("%s has no %s (written before checkpoints had one): loading it unverified",
                            ckpt_dir / tag, manifest.MANIFEST)
            break
        if not problems:
            break
        skipped.append({"tag": tag, "problems": problems})
        earlier = [t for t in complete_tags(ckpt_dir) if t < tag]
        tag = earlier[-1] if earlier else None
    if skipped and rank == 0:
        for damaged in skipped:
            log.warning("%s", describe_problems(ckpt_dir / damaged["tag"], damaged["problems"]))
            target = ckpt_dir / DAMAGED / damaged["tag"]
            if target.exists():
                target = target.with_name(f"{damaged['tag']}.{int(time.time())}")
            if (ckpt_dir / damaged["tag"]).exists():
                target.parent.mkdir(exist_ok=True)
                os.replace(ckpt_dir / damaged["tag"], target)
        if tag is not None:
            tmp = ckpt_dir / f".{POINTER}.tmp"
            tmp.write_text(tag + "\n")
            os.replace(tmp, ckpt_dir / POINTER)
        else:
            (ckpt_dir / POINTER).unlink(missing_ok=True)
        log.warning("resuming from %s instead: the damaged checkpoint(s) were moved to %s", tag or "the start",
                    ckpt_dir / DAMAGED)
    barrier()
    return tag, skipped


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


def verified(ckpt_dir: Path, tag: str) -> None:
    """Refuse a damaged checkpoint, naming what is wrong and the newest earlier step that verifies; warn of one
    written before manifests."""
    problems = problems_of(ckpt_dir / tag)
    if problems is None:
        log.warning("%s has no %s (written before checkpoints had one): reading it unverified", ckpt_dir / tag,
                    manifest.MANIFEST)
    elif problems:
        good = newest_good(ckpt_dir, before=tag)
        hint = (f"the newest checkpoint that verifies is {good} (step {int(good[4:])}): pick it with --step "
                f"{int(good[4:])} or {ckpt_dir / good}") if good else "no earlier checkpoint verifies"
        raise ExportError(f"{describe_problems(ckpt_dir / tag, problems)}; {hint}")


def consolidate(run_dir: Path, tag: Optional[str] = None) -> tuple[MTHLModel, dict]:
    """(single-device model, source description) of a run's checkpoint: ``tag``, or the latest complete one, for
    any ep_size, ZeRO stage and precision it was trained with; verified against its manifest first."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    tag = tag or pointed_tag(ckpt_dir)
    if tag is None:
        raise ExportError(f"{run_dir} has no complete checkpoint ({ckpt_dir / POINTER} is missing)")
    verified(ckpt_dir, tag)
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


# ------------------------------------------------------------------------------------------ mthl-ds verify

def verify_report(path: Path) -> tuple[str, bool]:
    """``mthl-ds verify``: a markdown table of ``path``'s checkpoints (a run folder, its ``checkpoints/`` or one
    checkpoint folder): step, files, bytes, and ok or what is wrong; and whether every one verifies."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if TAG.fullmatch(path.name):
        folders, pointer = [path], None
    elif path.is_dir():
        folders = sorted(p for p in path.iterdir() if TAG.fullmatch(p.name) and p.is_dir())
        pointer = pointed_tag(path)
    else:
        raise CheckpointError(f"{path}: neither a run folder, its checkpoints/ folder nor a checkpoint folder")
    if not folders:
        raise CheckpointError(f"{path} holds no checkpoint folder (stepNNNNNNNN)")
    lines = ["| step | files | bytes | status |", "|---|---|---|---|"]
    ok = True
    for folder in folders:
        problems = problems_of(folder)
        files = manifest.step_files(folder)
        if problems is None:
            status = ("not complete (no run.json): a save that did not finish" if not (folder / RUN_RECORD).is_file()
                      else "no manifest (written before checkpoints had one): not verified")
        else:
            ok &= not problems
            status = "ok" if not problems else f"DAMAGED: {'; '.join(problems)}"
        mark = " (latest_complete)" if folder.name == pointer else ""
        lines.append(f"| {int(folder.name[4:])}{mark} | {len(files)} | "
                     f"{sum((folder / f).stat().st_size for f in files)} | {status} |")
    return "\n".join(lines), ok

"""The training job, ``mthl-ds train``. Runs under any launcher, or none:

    deepspeed --num_gpus N --module mthl_ds train --recipe NAME --out RUN_DIR [--set key=value ...]
    torchrun --nproc_per_node N -m mthl_ds train --recipe NAME --out RUN_DIR
    mthl-ds train --recipe NAME --out RUN_DIR                                  # one rank
    python -m mthl_ds.train --recipe NAME --out RUN_DIR                        # the same, as before the verb

A run folder holds the resolved config, per-step metrics (JSONL + TensorBoard), checkpoints and the final
report. Started again with the same folder, a run resumes from its latest complete checkpoint.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
import yaml
from tqdm import tqdm

from mthl_ds.aes import AdaptiveTopK, heldout_positions
from mthl_ds.artifacts import checkpoint, surgery
from mthl_ds.artifacts.adapted import build_run_model, resolve_source
from mthl_ds.build import training_loss
from mthl_ds.config import ConfigError, Recipe, load_recipe, read_ds_config, recipe_to_dict
from mthl_ds.data.pipelines import DatasetLoader, eval_loader, make_decoder
from mthl_ds.data.reader import ShardSet
from mthl_ds.data.sampler import TwoStepSampler
from mthl_ds.data.shards import ShardError
from mthl_ds.errors import CheckpointError
from mthl_ds.evaluate import evaluate, pipeline_config
from mthl_ds.moe.grouped import backend, capacity_backend
from mthl_ds.runfiles import MetricsLog, keep_metrics, row_kind
from mthl_ds.runtime import cpu_half
from mthl_ds.runtime.collectives import all_gather_objects, all_reduce_, all_reduce_mean, all_reduce_sum, world
from mthl_ds.runtime.device import local_device, pin_memory, to_device
from mthl_ds.runtime.engine import build_engine, engine_state_bytes, ep_rank, init_distributed
from mthl_ds.runtime.optim import Lamb

log = logging.getLogger("mthl_ds.train")


class NonFiniteLoss(RuntimeError):
    pass


# ------------------------------------------------------------------------------------------ checks before start

def launch_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_world(recipe: Recipe, world_size: int) -> None:
    """Checks that need the world size, made from the launcher's environment before any process group."""
    ep = recipe.train.ep_size
    if recipe.model.moe is not None and world_size % ep:
        raise ConfigError(f"train.ep_size={ep} does not divide the world size {world_size}")
    ds = read_ds_config(recipe.train.ds_config)
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        if key in ds:
            raise ConfigError(f"{recipe.train.ds_config}: {key} is set at run time from datasets.<name>.batch_size; "
                              "remove it from the DeepSpeed config")


def dataset_dir(recipe: Recipe, name: str) -> Path:
    path = Path(recipe.datasets[name].shards or name)
    return path if path.is_absolute() else Path(recipe.train.data_root) / path


def open_shards(recipe: Recipe, world_size: int) -> dict[str, tuple[ShardSet, ShardSet]]:
    """Open every train/val shard set and check it against the recipe, before any expensive work."""
    sets = {}
    for name, d in recipe.datasets.items():
        root = dataset_dir(recipe, name)
        train, val = ShardSet.open(root / "train"), ShardSet.open(root / "val")
        for s in (train, val):
            if s.task != d.task:
                raise ConfigError(f"datasets.{name}: task {d.task!r} but {s.root} holds {s.task!r} shards")
            if s.index["num_classes"] != d.num_classes:
                raise ConfigError(f"datasets.{name}.num_classes={d.num_classes} but {s.root} has "
                                  f"{s.index['num_classes']} classes")
        train.check_split(world_size, recipe.train.workers)
        sets[name] = (train, val)
    return sets


EXIT_STOPPED = 75  # the run saved a checkpoint on request and should be started again (sbatch requeues)
EXIT_SAVE_FAILED = 74  # a checkpoint could not be written (disk full, I/O error): the previous one is intact


class StopFlag:
    """A request to checkpoint and stop: SIGUSR1 / SIGTERM to a rank, or a ``STOP`` file in the run folder
    (what slurm/train.sbatch creates on Slurm's warning signal). Ranks agree on it at a step boundary."""

    def __init__(self, stop_file: Path):
        self.requested = False
        self.stop_file = stop_file

    def install(self) -> None:
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def agreed(self, device: torch.device) -> bool:
        """Whether any rank was asked to stop (a collective and a host read: called at logged steps only)."""
        requested = self.requested or self.stop_file.exists()
        flag = all_reduce_sum(torch.tensor([1.0 if requested else 0.0], device=device))
        return bool(flag.item() > 0)


def use_deterministic_kernels() -> None:
    """``train.deterministic``: torch's deterministic kernels where it has them (index_add, scatter_add, convolutions,
    cuBLAS with a fixed workspace), a warning naming each op that has none (on CUDA: bilinear upsampling's and
    adaptive average pooling's backward, which UperNet uses), and no cuDNN autotuning. The cuBLAS setting takes
    effect only if this process has not used cuBLAS yet."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


def lamb_of(engine) -> Optional[Lamb]:
    """The engine's :class:`Lamb` (inside DeepSpeed's ZeRO or mixed-precision wrapper), or None."""
    optimizer = engine.optimizer
    while optimizer is not None and not isinstance(optimizer, Lamb):
        optimizer = getattr(optimizer, "optimizer", None)
    return optimizer


def resolved(records: list[dict]) -> list[dict]:
    """``records`` with every tensor value read into Python numbers (lists for tensors of more than one value),
    in one host sync."""
    leaves = [(i, k, v) for i, r in enumerate(records) for k, v in r.items() if isinstance(v, torch.Tensor)]
    if not leaves:
        return records
    values = torch.cat([v.detach().reshape(-1).double() for _, _, v in leaves]).tolist()
    out = [dict(r) for r in records]
    cursor = 0
    for i, key, tensor in leaves:
        n = tensor.numel()
        out[i][key] = values[cursor] if tensor.dim() == 0 else values[cursor:cursor + n]
        cursor += n
    return out


def logged_by(row: dict, steps_done: int) -> bool:
    """Whether a metrics row belongs to a run that has done ``steps_done`` steps: a training row's ``step`` is its
    step's index; AES and eval rows give the steps done when they were taken (at, or after, that checkpoint)."""
    return row.get("step", 0) < steps_done if row_kind(row) == "train" else row.get("step", 0) <= steps_done


# ------------------------------------------------------------------------------------------------ the trainer

class Trainer:
    """Top-down: :meth:`setup`, then :meth:`train_step` until done, :meth:`save` every ``ckpt_every`` steps,
    :meth:`evaluate` at the end (and every ``eval_every`` steps), then the report.

    A step leaves its figures on the device: :meth:`flush` reads every step's since the last in one host sync,
    every ``log_every`` steps and before a checkpoint, an evaluation or the end; it writes the metrics, warns
    of skipped steps and applies ``train.nonfinite``. The stop request is agreed on at the same points."""

    def __init__(self, recipe: Recipe, run_dir: Path):
        self.recipe, self.run_dir = recipe, Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.stop = StopFlag(self.run_dir / "STOP")
        self.history: list[dict] = []
        self.pending: list[dict] = []  # steps run since the last flush, their figures still on the device
        self.window_start = time.perf_counter()
        self.stopped_early = False
        self.damaged: list[dict] = []  # checkpoints a resume passed over, with what is wrong with each
        self.closed = False

    # ---- set-up
    def setup(self) -> None:
        self.recipe = r = resolve_source(self.recipe)
        check_world(r, launch_world_size())
        self.sets = open_shards(r, launch_world_size())
        checkpoint.check_resume(self.ckpt_dir, r)
        init_distributed(r.train.collective_timeout_s)
        self.rank, self.world = world()
        resume_tag, self.damaged = checkpoint.resume_tag(self.ckpt_dir, self.rank)
        if self.damaged and resume_tag:
            checkpoint.check_resume(self.ckpt_dir, r, resume_tag)
        self.device = local_device()
        if r.train.deterministic:
            use_deterministic_kernels()
        self.selection, self.heldout = None, {}
        if r.train.aes is not None:  # AdaMV-MoE: K per dataset from held-out losses; the held-out samples never train
            self.selection = AdaptiveTopK(r.top_k_per_dataset(), r.model.moe.num_experts, r.train.aes.patience)
            self.heldout = {n: heldout_positions([s["num_samples"] for s in self.sets[n][0].shards],
                                                 r.train.aes.holdout, r.train.seed, at_least=self.world)
                            for n in r.datasets}
        saved = checkpoint.rank_state(self.ckpt_dir, resume_tag, self.rank, self.world) if resume_tag else None
        self.start_loaders(saved["loaders"] if saved else {})
        torch.manual_seed(r.train.seed)
        self.build(build_run_model(r, r.train.ep_size, ep_rank(r.train.ep_size)))
        if resume_tag:
            self.load(resume_tag, saved)
        self.record_launch()
        if self.rank == 0:
            print(f"MoE dispatch: {self.moe_dispatch()}", flush=True)
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(recipe_to_dict(r), sort_keys=False))
            self.metrics_file = self.open_metrics()
            if self.damaged:  # a resume that passed over damaged checkpoints says so in the metrics too
                self.metrics_file.write("checkpoint", {"step": self.step, "checkpoint": {
                    "resumed_from": resume_tag, "damaged": self.damaged,
                    "moved_to": str(self.ckpt_dir / checkpoint.DAMAGED)}})
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=self.step)
        self.stop.install()

    def build(self, model: torch.nn.Module) -> None:
        """What a step needs besides data: the engine around ``model``, the sampler, the usage counters. (The
        benchmark builds a trainer with this alone and feeds it batches from memory.)"""
        r = self.recipe
        self.rank, self.world = world()
        self.device = local_device()
        self.engine, self.optimizer, self.scheduler = build_engine(model, r)
        self.model = self.engine.module
        self.lamb = lamb_of(self.engine)
        self.sampler = TwoStepSampler({n: d.sample_weight for n, d in r.datasets.items()}, r.train.seed,
                                      r.train.dataset_cycle)
        self.step = 0
        layers = self.model.backbone.moe_layers
        widest = max((layer.num_experts for layer in layers), default=0)
        self.usage = {n: torch.zeros(len(layers), widest, device=self.device) for n in r.datasets} if layers else {}

    def start_loaders(self, states: dict) -> None:
        """Build the training loaders and fork their workers now, before the model exists. A worker forked later
        shares the rank's pages copy-on-write, and each page the optimizer writes afterwards is copied into it:
        at the paper's sizes, GiBs per worker."""
        r = self.recipe
        self.loaders = {n: DatasetLoader(self.sets[n][0], make_decoder(pipeline_config(r, n), train=True),
                                         d.batch_size, self.rank, self.world, r.train.seed, r.train.workers,
                                         state=states.get(n), exclude=self.heldout.get(n), pin_memory=pin_memory())
                        for n, d in r.datasets.items()}
        for loader in self.loaders.values():
            loader.start()

    def record_launch(self) -> None:
        """Each rank notes how the launcher placed it (runs/…/launch/rank*.json), for multi-node checks."""
        keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "CROSS_RANK", "CROSS_SIZE", "MASTER_ADDR",
                "SLURM_JOB_ID", "SLURM_NODEID", "SLURM_RESTART_COUNT")
        folder = self.run_dir / "launch"
        folder.mkdir(parents=True, exist_ok=True)
        info = {"rank": self.rank, "world": self.world, "host": os.uname().nodename, "pid": os.getpid(),
                "start_step": self.step, "moe_dispatch": self.moe_dispatch(),
                **{k: os.environ[k] for k in keys if k in os.environ}}
        (folder / f"rank{self.rank}.json").write_text(json.dumps(info, indent=1) + "\n")

    def moe_dispatch(self) -> str:
        """How this run's MoE layers dispatch, ``capacity`` or ``dropless``, with the experts' backend in training on
        this device, dtype and expert-parallel size (``mthl_ds.moe.grouped``); ``dense`` without MoE layers."""
        if not self.model.backbone.moe_layers:
            return "dense"
        dispatch = self.recipe.model.moe.dispatch
        if dispatch == "dropless":
            return f"{dispatch} (experts: {backend(self.device, self.model.dtype)})"
        return f"{dispatch} (experts: {capacity_backend(self.device, self.recipe.train.ep_size)})"

    def record_exit(self) -> None:
        """Add the rank's peak resident memory and the steps it ran to its launch record."""
        path = self.run_dir / "launch" / f"rank{self.rank}.json"
        info = json.loads(path.read_text())
        info.update(end_step=self.step, peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                    engine_state_bytes=engine_state_bytes(self.engine))
        if self.device.type == "cuda":
            info["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(self.device)
        path.write_text(json.dumps(info, indent=1) + "\n")

    def open_metrics(self) -> MetricsLog:
        # drop what a killed run logged after its last checkpoint
        kept = keep_metrics(self.run_dir, lambda row: logged_by(row, self.step))
        self.history = [row for row in kept if row["kind"] == "train"]
        return MetricsLog(self.run_dir)

    # ---- one step
    def train_step(self, step: int) -> dict:
        """One step of one dataset; returns its record, whose figures stay on the device until :meth:`flush`.

        A step whose update is thrown away is skipped as a whole and still counts as a step: the LR schedule stays
        on the trainer's step, AES counts it in its patience, and the routing it measured neither moves
        ``B(D, E)`` nor the expert-usage counters. Two kinds: an fp16 gradient overflow, which DeepSpeed finds on
        the host (it lowers the loss scale and leaves weights and optimizer state as they were); and a non-finite
        loss on any rank, agreed on by a collective and applied on the device (:class:`mthl_ds.runtime.optim.Lamb`'s
        ``apply_mask``), with no host sync, so the trainer learns of it at the next flush. ``B(D, E)`` is folded
        only after the update, so a recomputed block (activation checkpointing) sees the buffer its forward saw."""
        start = time.perf_counter()
        r = self.recipe
        name = self.sampler.dataset_at(step)
        batch = to_device(next(self.loaders[name]), self.device, self.model.dtype)
        self.model.set_dataset(name)
        loss, task_loss, parts = training_loss(self.model, r, name, batch, output=self.engine(batch["image"]),
                                               reduce_mean=all_reduce_mean)
        nonfinite = self.nonfinite_ranks(loss)
        applied = nonfinite.sum() == 0
        record = {"step": step, "dataset": name, "loss": task_loss.detach(), **parts,
                  **{f"router/{k}": v for k, v in self.model.backbone.router_loss_terms().items()},
                  "lr": self.scheduler.get_last_lr()[0], "nonfinite_ranks": nonfinite}
        if self.engine.fp16_enabled():
            record["loss_scale"] = float(self.engine.optimizer.loss_scale)
        if step % r.train.log_every == 0 and self.model.backbone.gates:
            record["mi"] = self.model.backbone.routing_mi()
            record["routes_dropped"] = all_reduce_mean(self.model.backbone.routes_dropped())
        if self.lamb is not None:
            self.lamb.apply_mask = applied
        elif not bool(applied):  # another optimizer cannot skip on the device: one host sync per step
            return self.skipped(record, name, "non-finite loss", start)
        self.engine.backward(loss)
        self.engine.step()
        if not self.engine.was_step_applied():
            if self.rank == 0:
                log.warning("fp16 gradient overflow at step %d on dataset %r (loss scale %s): every rank skips the "
                            "update; the loss scale is now %s", step, name, record["loss_scale"],
                            self.engine.optimizer.loss_scale)
            return self.skipped(record, name, "gradient overflow", start)
        self.model.backbone.update_routing_buffers(all_reduce_mean, applied)
        if name in self.usage:  # (layers, widest): a pruned layer's counts padded with zeros
            usage = self.usage[name]
            counts = [layer.gate.counts for layer in self.model.backbone.moe_layers]
            counts = [c if len(c) == usage.shape[1] else F.pad(c, (0, usage.shape[1] - len(c))) for c in counts]
            usage += torch.stack(counts).float() * applied
        return {**record, "host_seconds": time.perf_counter() - start}

    def skipped(self, record: dict, name: str, reason: str, start: float) -> dict:
        with warnings.catch_warnings():  # PyTorch warns when the schedule moves before any optimizer step
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler.step()  # keep the schedule on the global step
        self.model.backbone.discard_routing_statistics()
        return {**record, "skipped": True, "skip_reason": reason, "host_seconds": time.perf_counter() - start}

    def nonfinite_ranks(self, loss: torch.Tensor) -> torch.Tensor:
        """(world,) on the device, 1 at each rank whose loss is not finite, the same on every rank."""
        flags = torch.zeros(self.world, device=loss.device)
        flags[self.rank] = (~torch.isfinite(loss.detach())).any().float()
        return all_reduce_(flags)

    def flush(self) -> None:
        """Read the figures of the steps since the last flush (one host sync), time them, act on non-finite
        losses (``train.nonfinite``) and, on rank 0, log them."""
        if not self.pending:
            return
        records, self.pending = resolved(self.pending), []
        now = time.perf_counter()
        window, host = now - self.window_start, sum(r["host_seconds"] for r in records)
        self.window_start = now
        for record in records:
            # the window's wall time shared by the steps' host times: exact for one step, and on the CPU
            seconds = window * record.pop("host_seconds") / max(host, 1e-9)
            record.update(seconds=seconds, images_per_s=self.recipe.datasets[record["dataset"]].batch_size
                          * self.world / seconds)
            ranks = [i for i, flag in enumerate(record.pop("nonfinite_ranks")) if flag]
            if ranks:
                message = f"non-finite loss at step {record['step']} on dataset {record['dataset']!r} (rank(s) {ranks})"
                if self.recipe.train.nonfinite == "stop":
                    raise NonFiniteLoss(message + "; stopping every rank (train.nonfinite=stop)")
                if self.rank == 0:
                    log.warning("%s; every rank skipped this step", message)
                record.update(skipped=True, skip_reason="non-finite loss")
            if self.rank == 0:
                self.log_step(record)
        if self.rank == 0:
            self.metrics_file.flush()
            last = records[-1]
            self.bar.set_postfix_str(f"{last['dataset']} loss {last['loss']:.3f} lr {last['lr']:.2e} "
                                     f"{last['images_per_s']:.0f} img/s", refresh=False)
            self.bar.update(len(records))

    # ---- adaptive expert selection (AdaMV-MoE)
    def select_top_k(self) -> list[dict]:
        """One AES check: every unfixed dataset's held-out loss (all ranks' mean), then Algorithm 1's decisions,
        applied as ``set_top_k`` surgery rules so checkpoints and exports carry the new K."""
        names = [n for n, s in self.selection.datasets.items() if not s.fixed]
        losses = self.heldout_losses(names)
        changes = self.selection.observe(self.step, losses)
        for change in changes:
            if change["k_to"] != change["k_from"]:
                surgery.apply(self.model, [{"op": "set_top_k", "name": change["dataset"], "k": change["k_to"]}])
        top_k = torch.tensor(list(self.selection.top_k.values()), dtype=torch.float64, device=self.device)
        if not torch.equal(all_reduce_sum(top_k), top_k * self.world):
            raise RuntimeError(f"step {self.step}: ranks disagree on K after an AES check (this rank: "
                               f"{self.selection.top_k})")
        if self.rank == 0:
            self.metrics_file.write("aes", {"step": self.step, "aes": {
                "heldout_loss": losses, "top_k": self.selection.top_k, "changes": changes}})
            for c in changes:
                tqdm.write(f"AES step {c['step']}: {c['dataset']} K {c['k_from']} -> {c['k_to']} ({c['action']}; "
                           f"held-out loss {c['loss']:.4f}, best {c['best']:.4f})")
        return changes

    @torch.no_grad()
    def heldout_losses(self, names: list[str]) -> dict[str, float]:
        """Mean task loss over each dataset's held-out training samples (eval mode), averaged over ranks."""
        r, aes = self.recipe, self.recipe.train.aes
        self.engine.eval()
        means = []
        for name in names:
            d = r.datasets[name]
            loader = eval_loader(self.sets[name][0], make_decoder(pipeline_config(r, name), train=False),
                                 d.eval_batch_size or d.batch_size, self.rank, self.world, only=self.heldout[name])
            self.model.set_dataset(name)
            losses = []
            for batch in loader:  # every rank reads the same number of (padded) batches
                if aes.max_batches and len(losses) == aes.max_batches:
                    break
                batch = to_device(batch, self.device, self.model.dtype)
                losses.append(self.model.heads[name].loss(self.engine(batch["image"]), batch)[0].double())
            means.append(torch.stack(losses).mean())
        self.engine.train()
        return dict(zip(names, all_reduce_mean(torch.stack(means)).tolist()))

    # ---- evaluation
    def evaluate(self) -> dict:
        """Val metrics, read in the rank's own process: a DataLoader worker forked here, after the process group
        and the training loaders' threads exist, can inherit a lock another thread holds and hang the rank."""
        self.engine.eval()
        results = evaluate(self.engine, self.model, self.recipe.datasets, {n: v for n, (_, v) in self.sets.items()},
                           self.rank, self.world, workers=0, reduce_sum=all_reduce_sum, gather=all_gather_objects,
                           device=self.device)
        self.engine.train()
        return results

    # ---- checkpoints
    def save(self) -> None:
        rank_state = {"loaders": {n: loader.state_dict() for n, loader in self.loaders.items()}, "usage": self.usage,
                      "aes": self.selection.state_dict() if self.selection else None}
        checkpoint.save(self.engine, self.ckpt_dir, self.step, self.recipe, self.model, rank_state, self.rank,
                        self.world)

    def load(self, tag: str, state: dict) -> None:
        """The engine, RNG states, routing usage and AES state from ``state`` (this rank's saved one); the loaders
        took their positions at start."""
        self.step = checkpoint.load(self.engine, self.ckpt_dir, tag, self.model, state)
        self.usage = {n: u.to(self.device) for n, u in state["usage"].items()}
        if self.selection is not None:
            self.selection.load_state_dict(state["aes"])
        if self.rank == 0:
            log.warning("resumed from %s at step %d", self.ckpt_dir / tag, self.step)

    # ---- logging and the run
    def log_step(self, record: dict) -> None:
        self.history.append(self.metrics_file.write("train", record))
        for key, value in record.items():
            if isinstance(value, float):
                self.tb.add_scalar(f"{record['dataset']}/{key}" if "/" not in key else key, value, record["step"])
        for layer, value in enumerate(record.get("mi", [])):
            self.tb.add_scalar(f"routing/mi_layer{layer}", value, record["step"])

    def run(self) -> Optional[dict]:
        self.setup()
        t = self.recipe.train
        self.bar = tqdm(total=t.steps, initial=self.step, disable=self.rank != 0, dynamic_ncols=True, mininterval=1.0)
        saved_at = self.step
        self.window_start = time.perf_counter()
        while self.step < t.steps:
            self.pending.append(self.train_step(self.step))
            self.step += 1
            if self.selection is not None and not self.selection.done and self.step % t.aes.every == 0:
                self.flush()
                self.select_top_k()
            if t.ckpt_every and self.step % t.ckpt_every == 0:
                self.flush()
                self.save()
                saved_at = self.step
            if t.eval_every and self.step % t.eval_every == 0 and self.step < t.steps:
                self.flush()
                self.log_eval(self.evaluate())
            if self.step % t.log_every == 0 or self.step == t.steps:
                self.flush()
                if self.stop.agreed(self.device):
                    if saved_at != self.step:
                        self.save()
                    self.bar.close()  # every rank says so: a multi-node job's node logs show where each node stopped
                    log.warning("rank %d on %s: stop requested, checkpoint saved at step %d", self.rank,
                                os.uname().nodename, self.step)
                    self.stopped_early = True
                    self.record_exit()
                    self.close()
                    return None
        self.flush()
        self.bar.close()
        if saved_at != self.step:
            self.save()
        results = self.evaluate()
        self.usage = {n: all_reduce_sum(u).cpu() for n, u in self.usage.items()}
        if self.rank == 0:
            self.finish(results)
        self.record_exit()
        self.close()
        return results

    def close(self) -> None:
        """Let the engine go with the trainer (``run`` ends with this). DeepSpeed's ZeRO 1/2 gradient hooks sit on
        the autograd graph's accumulators, in C++, and refer back to the engine: a cycle the collector cannot see,
        so a process that trains one model after another (a notebook, benchmarks) would otherwise keep every
        engine's weights, optimizer states and gradient buffers, on the GPU, until it exits. The model and the
        engine still run forward afterwards; the engine trains no more."""
        if not self.closed and hasattr(self, "engine"):
            self.engine.destroy()
            self.closed = True

    def log_eval(self, results: dict) -> None:
        if self.rank == 0:
            self.metrics_file.write("eval", {"step": self.step, "eval": results})
            for name, r in results.items():
                self.tb.add_scalar(f"{name}/eval_{r['metric']}", r["value"], self.step)

    def finish(self, results: dict) -> None:
        from mthl_ds.analysis.report import write_report
        self.log_eval(results)
        self.metrics_file.close()
        self.tb.close()
        final = {n: {k: r[k] for k in ("task", "metric", "value", "chance")} for n, r in results.items()}
        (self.run_dir / "final_metrics.json").write_text(json.dumps(final, indent=2) + "\n")
        (self.run_dir / "eval_metrics.json").write_text(json.dumps(results, indent=2) + "\n")
        mix = self.sampler.realised_mix(self.sampler.counts(0, self.step))
        report = write_report(self.run_dir, self.recipe, self.history, results, self.usage, mix)
        print(f"report: {report}")
        for name, r in final.items():
            print(f"{name:<10} {r['task']:<15} {r['metric']} {r['value']:.2f} (chance {r['chance']:.2f})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mthl-ds train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--out", type=Path, required=True, help="the run folder (resumed if it has checkpoints)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--cpu-fp16", action="store_true",
                        help="fp16 on CPU ranks (rehearsals, tests): fp16 matmuls in float32, "
                             "see mthl_ds.runtime.cpu_half")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    args = parser.parse_args(argv)
    if args.cpu_fp16:
        cpu_half.enable()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        recipe = load_recipe(args.recipe, args.set)
        trainer = Trainer(recipe, args.out)
        trainer.run()
    except checkpoint.CheckpointSaveError as e:
        print(f"mthl-ds train: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_SAVE_FAILED
    except (ConfigError, ShardError, CheckpointError, NonFiniteLoss) as e:
        print(f"mthl-ds train: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    return EXIT_STOPPED if trainer.stopped_early else 0


if __name__ == "__main__":
    sys.exit(main())

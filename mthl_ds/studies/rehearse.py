"""``mthl-ds rehearse RECIPE``: the paper's run at its real shapes and precision on N ranks (one per GPU where CUDA
is, else CPU ranks), reduced only in batch and steps, so the first time the real job meets its shapes is not on the
cluster.

    DIR/world/    ImageNet, COCO and ADE20K at their real resolutions and label spaces (synth.write_real_size_world)
    DIR/shards/   their shards, made by the same converters as real data
    DIR/run/      the recipe's real model under the deepspeed launcher (ZeRO as configured, LAMB; fp16 on CPU ranks
                  through train --cpu-fp16): every dataset in turn, a checkpoint, a second launch that resumes from
                  it for one more step, an evaluation at the end of each launch
    DIR/dense/    the dense twin (MTHL.D) at the same shapes, for the step-time ratio
    DIR/model.safetensors, DIR/rehearsal.json, DIR/rehearsal.md

It reports per dataset the step seconds (its fastest step) and their ratio to the dense twin next to the
FLOPs ratio, the tokens per MoE call and expert capacity, the peak RSS of every rank, the engine's states per rank
against the memory plan at N GPUs, and the memory plan at 96 GPUs (mthl_ds.studies.memory).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import time
from pathlib import Path

from mthl_ds.config import ConfigError, Recipe, load_recipe
from mthl_ds.geometry import input_shape
from mthl_ds.runfiles import read_metrics

PRECISION_CONFIGS = {"fp16": "zero2_fp16.json", "bf16": "zero2_bf16.json", "fp32": "zero2_fp32.json"}


class RehearsalError(RuntimeError):
    """A phase of the rehearsal failed; the message names it and where its output is."""


def launch(recipe: str, run_dir: Path, overrides: list[str], ranks: int, precision: str, phase: str) -> None:
    """``mthl-ds train`` on ``ranks`` ranks under the deepspeed launcher: GPUs where CUDA is, else CPU ranks (fp16
    there through ``--cpu-fp16``)."""
    import torch

    from mthl_ds.runtime.engine import launcher_free_env
    from mthl_ds.studies.launch import train_command
    cpu_fp16 = precision == "fp16" and not torch.cuda.is_available()
    cmd = train_command(ranks, recipe, run_dir, overrides, cpu_fp16=cpu_fp16)
    env = dict(launcher_free_env(), OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // ranks)))
    rc = subprocess.call(cmd, env=env)
    if rc != 0:
        raise RehearsalError(f"{phase} failed with exit code {rc} ({run_dir}); its output is above")


def step_rows(run_dir: Path) -> list[dict]:
    return read_metrics(run_dir, "train")


def rank_records(run_dir: Path, ranks: int) -> list[dict]:
    return [json.loads((run_dir / "launch" / f"rank{r}.json").read_text()) for r in range(ranks)]


def forward_flops(recipe: Recipe) -> dict[str, int]:
    """FLOPs of one image's forward (backbone and head, torch's counter) at each dataset's input shape."""
    from mthl_ds.build import build_model
    from mthl_ds.models.counting import image_flops
    model = build_model(recipe)
    return {name: image_flops(model, name, input_shape(d.task, d.size), backbone_only=False)
            for name, d in recipe.datasets.items()}


def rank_batch(recipe: Recipe, name: str, batch_size: int, ranks: int) -> int:
    """The per-rank training batch of ``name``: ``batch_size``, but for segmentation at least what gives UperNet's
    synchronised BatchNorm two images over all ranks (its pyramid pooling normalises 1 x 1 features: one image
    has one value per channel, which BatchNorm refuses in training)."""
    if recipe.datasets[name].task == "segmentation":
        return max(batch_size, math.ceil(2 / ranks))
    return batch_size


def dense_twin_overrides(recipe: Recipe) -> list[str]:
    return ["model.moe=null"] + (["train.aes=null"] if recipe.train.aes is not None else [])


def rehearse(recipe_name: str, out: Path, ranks: int = 2, precision: str = "fp16", steps: int = 0,
             batch_size: int = 1, overrides: tuple[str, ...] = (), dense: bool = True, progress=print) -> dict:
    """Run the rehearsal (module docstring) and return its figures; writes DIR/rehearsal.{json,md}."""
    import torch

    from mthl_ds.artifacts.export import export_run, load_export
    from mthl_ds.studies.memory import capacity_at, plan_recipe, state_bytes
    from mthl_ds.studies.synth import write_real_size_shards
    if precision not in PRECISION_CONFIGS:
        raise ConfigError(f"--precision {precision!r}: choose from {sorted(PRECISION_CONFIGS)}")
    out = out.resolve()
    paper = load_recipe(recipe_name, overrides)  # the real run: its memory plan, at its own precision
    names = list(paper.datasets)
    steps = steps or len(names)
    moe = paper.model.moe
    ep = math.gcd(ranks, moe.num_experts) if moe else 1
    start = time.time()
    shards = write_real_size_shards(out, ranks)
    settings = [*overrides, f"train.ds_config={PRECISION_CONFIGS[precision]}", f"train.ep_size={ep}",
                f"train.data_root={shards}", "train.workers=1", f"train.dataset_cycle=[{','.join(names)}]",
                "train.log_every=1", "train.eval_every=0",
                "train.keep_checkpoints=1"]  # disk: a real-size checkpoint is GBs
    for n in names:
        settings += [f"datasets.{n}.batch_size={rank_batch(paper, n, batch_size, ranks)}",
                     f"datasets.{n}.eval_batch_size={batch_size}"]
    recipe = load_recipe(recipe_name, settings + [f"train.steps={steps + 1}"])  # refused here, before any launch
    progress(f"rehearse {recipe_name}: {ranks} ranks, {precision}, ep_size {ep}, batch {batch_size} per rank, "
             f"{steps} steps, then one more after a resume; data ready in {time.time() - start:.0f} s")
    run_dir = out / "run"
    launch(recipe_name, run_dir, settings + [f"train.steps={steps}", f"train.ckpt_every={steps}"], ranks, precision,
           "the first launch")
    launch(recipe_name, run_dir, settings + [f"train.steps={steps + 1}", f"train.ckpt_every={steps}"], ranks,
           precision, "the resumed launch")
    resumed = rank_records(run_dir, ranks)
    if any(r["start_step"] != steps for r in resumed):
        raise RehearsalError(f"the second launch did not resume at step {steps}: {[r['start_step'] for r in resumed]}")
    export = export_run(run_dir, out / "model.safetensors")
    load_export(export)
    rows = step_rows(run_dir)
    dense_rows = []
    if dense and moe is not None:
        launch(recipe_name, out / "dense", settings + dense_twin_overrides(recipe) +
               [f"train.steps={steps}", "train.ckpt_every=0"], ranks, precision, "the dense twin")
        dense_rows = step_rows(out / "dense")
    if dense_rows:
        flops = forward_flops(recipe)
        dense_flops = forward_flops(load_recipe(recipe_name, settings + dense_twin_overrides(recipe)))
    plan = plan_recipe(paper, 96, (16, 32), progress=progress)
    measured_states = [r["engine_state_bytes"] for r in resumed]
    planned_states = state_bytes(recipe, plan["parameters"]["shared"], plan["parameters"]["experts"], ranks, ep)
    final = json.loads((run_dir / "final_metrics.json").read_text())
    datasets = {}
    for name in names:
        seconds = min(r["seconds"] for r in rows if r["dataset"] == name and "seconds" in r)
        dense_s = min((r["seconds"] for r in dense_rows if r["dataset"] == name and "seconds" in r), default=None)
        per_image = plan["activations"][name].get("tokens_per_moe_call")  # measured at batch 1
        tokens, tokens_paper = (per_image * recipe.datasets[name].batch_size,
                                per_image * paper.datasets[name].batch_size) if per_image \
            else (None, None)
        datasets[name] = {
            "task": recipe.datasets[name].task,
            "input": list(input_shape(recipe.datasets[name].task, recipe.datasets[name].size)), "step_s": seconds,
            "dense_step_s": dense_s, "step_ratio": seconds / dense_s if dense_s else None,
            "flops_ratio": flops[name] / dense_flops[name] if dense_rows else None, "tokens_per_moe_call": tokens,
            "capacity": capacity_at(recipe, name, tokens) if tokens else None, "tokens_at_recipe_batch": tokens_paper,
            "capacity_at_recipe_batch": capacity_at(paper, name, tokens_paper) if tokens else None,
            "metric": final[name]["metric"], "value": final[name]["value"]}
    result = {"recipe": recipe_name, "ranks": ranks, "device": "cuda" if torch.cuda.is_available() else "cpu",
              "precision": precision, "ep_size": ep, "batch_per_rank": batch_size,
              "steps": steps + 1, "wall_s": time.time() - start, "datasets": datasets,
              "peak_rss_bytes": [r["peak_rss_bytes"] for r in resumed],
              "peak_gpu_bytes": [r.get("peak_gpu_bytes") for r in resumed],
              "engine_states": {"measured": measured_states, "planned": planned_states},
              "skipped_steps": [r["step"] for r in step_rows(run_dir) if r.get("skipped")],
              "export": str(export), "memory_plan": plan}
    (out / "rehearsal.json").write_text(json.dumps(result, indent=1) + "\n")
    report = format_report(result)
    (out / "rehearsal.md").write_text(report + "\n")
    progress(report)
    return result


def format_report(result: dict) -> str:
    from mthl_ds.studies.memory import GIB, format_plan
    f = lambda v, fmt: "" if v is None else format(v, fmt)  # noqa: E731
    lines = [f"# Rehearsal: {result['recipe']}", "",
             f"{result['ranks']} {result.get('device', 'cpu').upper()} ranks, {result['precision']}, "
             f"ep_size {result['ep_size']}, batch "
             f"{result['batch_per_rank']} per rank, {result['steps']} steps (checkpoint, resume, export, evaluation) "
             f"in {result['wall_s']:.0f} s; peak RSS per rank "
             + ", ".join(f"{b / GIB:.2f}" for b in result["peak_rss_bytes"]) + " GiB"
             + ("; peak GPU memory allocated per rank " + ", ".join(f"{b / GIB:.2f}" for b in result["peak_gpu_bytes"])
                + " GiB" if all(result.get("peak_gpu_bytes") or [None]) else "") + "; steps skipped "
             f"{result['skipped_steps'] or 'none'}", "",
             "| dataset | input | step s | MTHL.D step s | ratio | FLOPs ratio | tokens / MoE call, rank batch (recipe "
             "batch) | expert capacity (recipe batch) |", "|---|---|---|---|---|---|---|---|"]
    for name, d in result["datasets"].items():
        lines.append(f"| {name} | {d['input'][0]} x {d['input'][1]} | {d['step_s']:.2f} "
                     f"| {f(d['dense_step_s'], '.2f')} | {f(d['step_ratio'], '.2f')} | {f(d['flops_ratio'], '.3f')} "
                     f"| {f(d['tokens_per_moe_call'], 'd')} "
                     f"({f(d['tokens_at_recipe_batch'], 'd')}) | {f(d['capacity'], 'd')} "
                     f"({f(d['capacity_at_recipe_batch'], 'd')}) |")
    states = result["engine_states"]
    lines += ["", "Engine states per rank, measured / planned (MiB): " + "; ".join(
        f"rank {i}: weights {m['weights'] / 2 ** 20:.1f} / {states['planned']['weights'] / 2 ** 20:.1f}, "
        f"optimizer {m['optimizer'] / 2 ** 20:.1f} / {states['planned']['optimizer'] / 2 ** 20:.1f}"
        for i, m in enumerate(states["measured"])), "", format_plan(result["memory_plan"])]
    return "\n".join(lines)

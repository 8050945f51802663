"""``mthl-ds bench``: the stack measured against its own limits.

Each benchmark times a candidate and a baseline side by side in one process (alternating, repeated) and
reports the median ratio with its spread, the target, and the work done (FLOPs or bytes) so the distance to
the machine's limit shows. The machine's matmul peak is measured in the same run.

    B1  MoE MLP fwd+bwd vs the FLOPs-matched dense MLP                   target <= 1.2x
    B2  MoE MLP with E=24 vs E=12 at the same K                          target <= 1.05x
    B3  demo train step, MTHL vs MTHL.D, per dataset                     target <= FLOPs ratio x 1.05
    B4  2 ranks, ep_size 2 vs ep_size 1, same global work                target <= 1.10x
    B5  classification pipeline vs bare decode+crop; vs demo consumption target >= 0.9x; >= 3x
    B6  optimizer + gradient state bytes per rank, ZeRO 2 vs stage 0      target <= 0.55x
    B7  peak resident memory of the demo model and engine per rank
    B8  model FLOPs utilisation of the demo train step vs the matmul peak
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from timm.layers import Mlp

from mthl_ds.build import training_loss
from mthl_ds.config import Recipe, load_recipe
from mthl_ds.models.counting import count_flops
from mthl_ds.moe.gate import PerDatasetGate
from mthl_ds.moe.layer import MoEMlp
from mthl_ds.runtime.engine import free_port, launcher_free_env
from mthl_ds.studies.bench.common import side_by_side
from mthl_ds.studies.model_info import dense_twin
from mthl_ds.tasks import fake_batch

COLUMNS = ["id", "benchmark", "candidate", "baseline", "ratio", "spread", "target", "met", "work"]


def row(bid: str, benchmark: str, candidate: str, baseline: str, ratio: float | None = None,
        spread: tuple[float, float] | None = None, target: str = "", met: bool | None = None, work: str = "",
        **values) -> dict:
    return {"id": bid, "benchmark": benchmark, "candidate": candidate, "baseline": baseline,
            "ratio": None if ratio is None else round(ratio, 3),
            "spread": "" if spread is None else f"[{spread[0]:.2f}, {spread[1]:.2f}]",
            "target": target, "met": met, "work": work, **values}


def matmul_peak(size: int = 1024, repeats: int = 10, dtype=torch.float32, device: str = "cpu") -> float:
    """Best FLOP/s of a square matmul: the machine's practical limit for the models' dominant op."""
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    best = float("inf")
    for _ in range(repeats + 1):
        if device != "cpu":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device != "cpu":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best


# ---- B1, B2: one MoE MLP layer
def moe_mlp(dim: int, num_experts: int, top_k: int, dense_hidden: int) -> MoEMlp:
    gate = PerDatasetGate(dim, num_experts, ["bench"], {"bench": top_k}, capacity_factor=1.0,
                          loss_coefs={"mi": 0.01})
    gate.context.dataset = "bench"
    return MoEMlp(dim, dense_hidden // top_k, num_experts, gate)


def fwd_bwd(module: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def step():
        module.zero_grad(set_to_none=True)
        module(x).sum().backward()
    return step


def layer_rows(dim: int, tokens: int, experts: int, top_k: int, repeats: int) -> list[dict]:
    x = torch.randn(tokens, dim, requires_grad=True)
    moe, moe_2x = moe_mlp(dim, experts, top_k, 4 * dim), moe_mlp(dim, 2 * experts, top_k, 4 * dim)
    dense = Mlp(dim, 4 * dim)
    shape = f"d={dim}, {tokens} tokens, K={top_k}, capacity factor 1.0"
    r1 = side_by_side(fwd_bwd(moe, x), fwd_bwd(dense, x), repeats)
    flops_moe, flops_dense = count_flops(fwd_bwd(moe, x)), count_flops(fwd_bwd(dense, x))
    r2 = side_by_side(fwd_bwd(moe_2x, x), fwd_bwd(moe, x), repeats)
    return [
        row("B1", f"MoE MLP fwd+bwd vs dense MLP ({shape})", f"E={experts}: {1e3 * r1['candidate_s']:.1f} ms",
            f"dense hidden {4 * dim}: {1e3 * r1['baseline_s']:.1f} ms", r1["ratio_median"],
            (r1["ratio_min"], r1["ratio_max"]), "<= 1.2", r1["ratio_median"] <= 1.2,
            f"{flops_moe / 1e9:.2f} vs {flops_dense / 1e9:.2f} GFLOP; "
            f"{flops_moe / r1['candidate_s'] / 1e9:.1f} vs {flops_dense / r1['baseline_s'] / 1e9:.1f} GFLOP/s",
            flop_per_s=flops_moe / r1["candidate_s"]),
        row("B2", f"MoE MLP fwd+bwd, 2E vs E experts ({shape})", f"E={2 * experts}: {1e3 * r2['candidate_s']:.1f} ms",
            f"E={experts}: {1e3 * r2['baseline_s']:.1f} ms", r2["ratio_median"], (r2["ratio_min"], r2["ratio_max"]),
            "<= 1.05", r2["ratio_median"] <= 1.05),
    ]


# ---- B3, B8: the demo model's train step, one process
def train_step(model, recipe: Recipe, optimizer, name: str, batch: dict) -> Callable[[], None]:
    def step():
        model.set_dataset(name)
        optimizer.zero_grad(set_to_none=True)
        training_loss(model, recipe, name, batch).loss.backward()
        optimizer.step()
    return step


def demo_rows(recipe: Recipe, repeats: int, peak: float) -> tuple[list[dict], dict]:
    from mthl_ds.build import build_model
    from mthl_ds.runtime.engine import optimizer_groups
    from mthl_ds.runtime.optim import Lamb

    models = {"MTHL": build_model(recipe), "MTHL.D": build_model(dense_twin(recipe))}
    optimizers = {k: Lamb(optimizer_groups(m, 0.05), lr=1e-4) for k, m in models.items()}
    rows, step_s = [], {}
    for name in recipe.datasets:
        batch = fake_batch(recipe, name)
        steps = {k: train_step(m, recipe, optimizers[k], name, batch) for k, m in models.items()}
        flops = {}
        for k, m in models.items():
            m.set_dataset(name)
            flops[k] = count_flops(lambda: training_loss(m, recipe, name, batch).loss.backward())
            m.zero_grad(set_to_none=True)
        r = side_by_side(steps["MTHL"], steps["MTHL.D"], repeats)
        limit = 1.05 * flops["MTHL"] / flops["MTHL.D"]
        step_s[name] = r["candidate_s"]
        rows.append(row("B3", f"demo train step on a {name} batch ({recipe.datasets[name].batch_size} images)",
                        f"MTHL {1e3 * r['candidate_s']:.0f} ms", f"MTHL.D {1e3 * r['baseline_s']:.0f} ms",
                        r["ratio_median"], (r["ratio_min"], r["ratio_max"]), f"<= {limit:.2f} (FLOPs ratio x 1.05)",
                        r["ratio_median"] <= limit,
                        f"{flops['MTHL'] / 1e9:.2f} vs {flops['MTHL.D'] / 1e9:.2f} GFLOP per step"))
        mfu = flops["MTHL"] / r["candidate_s"] / peak
        rows.append(row("B8", f"demo MTHL train step MFU on {name}",
                        f"{flops['MTHL'] / r['candidate_s'] / 1e9:.1f} GFLOP/s",
                        f"matmul peak {peak / 1e9:.1f} GFLOP/s", mfu, work="fwd+bwd FLOPs (torch counter) / step time",
                        mfu=mfu))
    return rows, step_s


# ---- B4, B6, B7: two ranks (mthl_ds.studies.bench.ranks under torchrun)
def rank_results(steps: int, repeats: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ranks.json"
        env = launcher_free_env()
        env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               "-m", "mthl_ds.studies.bench.ranks", str(out), str(steps), str(repeats)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:  # the ranks' own tracebacks and torchrun's summary (exit codes, signals)
            lines = [line for line in proc.stderr.splitlines() if "Warning" not in line]
            raise RuntimeError(f"2-rank benchmark failed (rc {proc.returncode}):\n" + "\n".join(lines[-60:]))
        return json.loads(out.read_text())


def rank_rows(result: dict) -> list[dict]:
    b4, b6 = result["b4"], result["b6"]
    per_rank_mib = ", ".join(f"{m / 2 ** 20:.0f}" for m in result["b7_max_rss"])
    return [
        row("B4", "2 ranks, demo train steps (each dataset once), ZeRO 2",
            f"ep_size 2: {1e3 * b4['candidate_s']:.0f} ms",
            f"ep_size 1: {1e3 * b4['baseline_s']:.0f} ms", b4["ratio_median"], (b4["ratio_min"], b4["ratio_max"]),
            "<= 1.10", b4["ratio_median"] <= 1.10, "same global batch; 1 thread per rank"),
        row("B6", "optimizer + gradient state bytes per rank (demo, 2 ranks, ep_size 2)",
            f"ZeRO 2: {b6['zero2'] / 2 ** 20:.2f} MiB", f"stage 0: {b6['stage0'] / 2 ** 20:.2f} MiB",
            b6["zero2"] / b6["stage0"], target="<= 0.55", met=b6["zero2"] / b6["stage0"] <= 0.55,
            work="; ".join(f"{k} {v / 2 ** 20:.2f} MiB" for k, v in b6["zero2_parts"].items())),
        row("B7", "peak resident memory per rank: demo model + ZeRO 2 engine, 2 ranks", f"{per_rank_mib} MiB", "",
            work="ru_maxrss after the demo engine's steps; loader workers not included",
            max_rss=result["b7_max_rss"]),
    ]


# ---- B5: data pipeline
def data_rows(count: int, repeats: int, demo_step_s: dict, recipe: Recipe) -> list[dict]:
    from mthl_ds.studies.bench.data import run as data_run
    pipeline = data_run(count=count, repeats=repeats)
    cls = pipeline[0]
    rows = [row("B5", cls["benchmark"].removeprefix("B5 "), cls["candidate"], cls["baseline"], cls["throughput_ratio"],
                target=">= 0.9", met=cls["throughput_ratio"] >= 0.9, work="images/s, one worker")]
    name = next(n for n, d in recipe.datasets.items() if d.task == "classification")
    consumed = recipe.datasets[name].batch_size / demo_step_s[name]
    rows.append(row("B5", f"classification pipeline (1 worker) vs what a demo {name} step consumes (1 process)",
                    f"{cls['images_per_s']:.0f} img/s", f"{consumed:.0f} img/s", cls["images_per_s"] / consumed,
                    target=">= 3", met=cls["images_per_s"] / consumed >= 3))
    for extra in pipeline[1:]:
        rows.append(row("B5", extra["benchmark"], extra["candidate"], ""))
    return rows


def run(smoke: bool = False, repeats: int = 5, only: set[str] | None = None) -> list[dict]:
    """Every benchmark (``only``: a subset of ids); ``smoke`` shrinks sizes and repeats to check the code path."""
    wanted = lambda *ids: only is None or any(i in only for i in ids)  # noqa: E731
    repeats = 2 if smoke else repeats
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    peak = matmul_peak(256 if smoke else 1024)
    rows = [row("peak", f"matmul {256 if smoke else 1024}^3 fp32, {torch.get_num_threads()} threads",
                f"{peak / 1e9:.1f} GFLOP/s", "", peak_flop_per_s=peak)]
    if wanted("B1", "B2"):
        rows += layer_rows(*((32, 64, 4, 2) if smoke else (384, 16 * 196, 12, 4)), repeats=repeats)
    recipe = load_recipe("demo")
    step_s = {}
    if wanted("B3", "B8", "B5"):
        demo, step_s = demo_rows(recipe, repeats, peak)
        rows += [r for r in demo if wanted(r["id"])]
    if wanted("B4", "B6", "B7"):
        rows += [r for r in rank_rows(rank_results(steps=1 if smoke else 3, repeats=repeats)) if wanted(r["id"])]
    if wanted("B5"):
        rows += data_rows(40 if smoke else 400, repeats, step_s, recipe)
    return rows

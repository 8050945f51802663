"""`mthl-ds rehearse`: the paper's recipes at their real input sizes and precision on 2 CPU ranks under the deepspeed
launcher (mthl_swin_t in fp16, as the V100 run; a ViT companion in bf16): every dataset steps, a checkpoint, a
resume, an export, an evaluation, and the memory plan, whose ZeRO states match the engines' byte for byte."""
import json
import math
import shutil
import subprocess
import sys

import pytest

from mthl_ds.config import load_recipe
from mthl_ds.runtime.engine import launcher_free_env


def rehearse(tmp_path_factory, recipe, precision, settings=()):
    out = tmp_path_factory.mktemp(f"rehearse_{recipe}")
    sets = [arg for s in settings for arg in ("--set", s)]
    proc = subprocess.run([sys.executable, "-m", "mthl_ds.cli", "rehearse", recipe, "--ranks", "2", "--precision",
                           precision, "--no-dense", "--out", str(out), *sets], capture_output=True, text=True,
                          env=launcher_free_env(), timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out, json.loads((out / "rehearsal.json").read_text()), proc.stdout


@pytest.fixture(scope="module")
def swin_t(tmp_path_factory):
    result = rehearse(tmp_path_factory, "mthl_swin_t", "fp16", ["train.seed=7"])
    yield result
    shutil.rmtree(result[0])  # GBs of real-size checkpoints: gone before the next module's run


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    result = rehearse(tmp_path_factory, "modsquad_vit_s", "bf16")
    yield result
    shutil.rmtree(result[0])


def check_run(out, result, experts):
    rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [0, 1, 2, 3]
    assert [r["dataset"] for r in steps] == ["imagenet", "coco", "ade20k", "imagenet"]
    assert all(math.isfinite(r["loss"]) for r in steps)
    ranks = [json.loads((out / "run" / "launch" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["start_step"], r["end_step"]) for r in ranks] == [(3, 4), (3, 4)]  # the second launch resumed
    from mthl_ds.artifacts.export import read_metadata
    assert read_metadata(out / "model.safetensors")["source"]["step"] == 4
    assert [r for r in rows if "eval" in r] and set(result["datasets"]) == {"imagenet", "coco", "ade20k"}
    assert {n: d["input"] for n, d in result["datasets"].items()} == {
        "imagenet": [224, 224], "coco": [800, 1344], "ade20k": [512, 512]}
    assert all(d["step_s"] > 0 for d in result["datasets"].values())
    assert result["ep_size"] == 2 and len(result["peak_rss_bytes"]) == 2
    measured, planned = result["engine_states"]["measured"], result["engine_states"]["planned"]
    for rank in measured:  # the plan's ZeRO formulas on the real model at 2 ranks: weights to the byte, optimizer
        assert rank["weights"] == pytest.approx(planned["weights"], abs=64)  # states up to each partition's padding
        assert rank["optimizer"] == pytest.approx(planned["optimizer"], rel=1e-4)
    plan = result["memory_plan"]
    assert plan["gpus"] == 96 and [p["ep_size"] for p in plan["plans"]] == [
        e for e in range(1, experts + 1) if experts % e == 0 and 96 % e == 0]
    assert all(set(p["fits"]) == {"16", "32"} for p in plan["plans"])
    for name, a in plan["activations"].items():
        assert 0 < a["bytes"]["1"]["checkpointed"] < a["bytes"]["1"]["plain"] < a["bytes"]["2"]["plain"], name
    return plan


def test_swin_t_fp16_at_the_papers_shapes(swin_t):
    out, result, stdout = swin_t
    plan = check_run(out, result, experts=12)
    assert result["precision"] == "fp16" and plan["precision"] == "fp16"
    assert "seed: 7" in (out / "run" / "config.yaml").read_text()  # --set reaches the run's recipe
    coco = result["datasets"]["coco"]
    # 800 x 1344 / 4^2 = 67200 tokens per image at the first stage; capacity ceil(1.0 * 4 * S / 12)
    assert coco["tokens_per_moe_call"] == 67200 and coco["capacity"] == 22400
    assert plan["activations"]["coco"]["capacity"] == coco["capacity"]  # what the gate itself sized
    assert coco["tokens_at_recipe_batch"] == 134400 and coco["capacity_at_recipe_batch"] == 44800
    assert "| coco | 800 x 1344 |" in stdout and "memory plan per GPU: mthl_swin_t, 96 GPUs, fp16" in stdout


def test_vit_companion_bf16_at_the_papers_shapes(vit):
    out, result, _ = vit
    check_run(out, result, experts=16)
    assert result["precision"] == "bf16" and result["skipped_steps"] == []
    assert result["datasets"]["coco"]["tokens_per_moe_call"] == 50 * 84 + 1  # patches and the class token


def test_one_rank_trains_segmentation_with_two_images():
    """UperNet's pyramid pooling normalises 1 x 1 features: on one rank a segmentation batch needs two images
    (BatchNorm refuses one value per channel in training); other datasets keep the batch asked for."""
    from mthl_ds.studies.rehearse import rank_batch
    recipe = load_recipe("mthl_swin_t")
    assert [rank_batch(recipe, "ade20k", 1, ranks) for ranks in (1, 2, 4)] == [2, 1, 1]
    assert rank_batch(recipe, "imagenet", 1, 1) == 1 and rank_batch(recipe, "ade20k", 3, 1) == 3

"""The training job on 2 gloo ranks with real engines: exact resume, ZeRO stages, the non-finite guard,
and config errors caught before any process group exists."""
import json
import shutil
import subprocess
import sys
import time

import pytest
import torch
from conftest import demo_overrides, run_ranks, train_cli

from mthl_ds.runtime.engine import launcher_free_env


def checkpoint_tensors(ckpt):
    """Every weight of a DeepSpeed checkpoint folder: the non-expert module state and each expert file."""
    tensors = dict(torch.load(ckpt / "mp_rank_00_model_states.pt", weights_only=False)["module"])
    for f in sorted(ckpt.glob("layer_*_expert_*_model_states.pt")):
        tensors.update(torch.load(f, weights_only=False))
    return tensors


def step_losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.parametrize("ds_config", ["zero1_fp32.json", "zero2_fp32.json"])
def test_resume_is_bitwise_identical(shards, tmp_path, ds_config):
    overrides = demo_overrides(shards, steps=8, ckpt_every=4, keep_checkpoints=3, ds_config=ds_config, workers=2)
    straight = tmp_path / "straight"
    train_cli(straight, overrides)
    assert (straight / "checkpoints" / "latest_complete").read_text().strip() == "step00000008"
    # the same run stopped after its step-4 checkpoint: step 8 never happened
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step00000008")
    (resumed / "checkpoints" / "latest_complete").write_text("step00000004\n")
    proc = train_cli(resumed, overrides)
    assert "resumed from" in proc.stderr and "at step 4" in proc.stderr
    a, b = step_losses(straight), step_losses(resumed)
    assert sorted(b) == list(range(8)) and all(a[s] == b[s] for s in range(8)), (a, b)
    wa = checkpoint_tensors(straight / "checkpoints" / "step00000008")
    wb = checkpoint_tensors(resumed / "checkpoints" / "step00000008")
    assert set(wa) == set(wb) and any("deepspeed_experts" in k for k in wa)
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key
    assert json.loads((resumed / "final_metrics.json").read_text()) == json.loads(
        (straight / "final_metrics.json").read_text())


def test_zero_stages_give_the_same_losses(shards, tmp_path):
    run_ranks("trainer_ranks.py", 2, ["zero", str(shards), str(tmp_path)])
    losses = json.loads((tmp_path / "summary.json").read_text())
    base = losses["stage0_fp32.json"]
    assert len(base) == 6
    for cfg in ("zero1_fp32.json", "zero2_fp32.json"):
        # float32 rounding (partitioned reductions sum in another order) at first, ~1e-7; Adam then amplifies
        # it on parameters whose gradients are near zero, so later steps get a looser bound
        assert losses[cfg][:5] == pytest.approx(base[:5], rel=1e-5), cfg
        assert losses[cfg] == pytest.approx(base, rel=2e-3), cfg


def test_a_finished_trainer_lets_its_engine_go(shards, tmp_path):
    """ZeRO 2's gradient hooks tie the engine to the autograd graph, out of the cycle collector's sight: ``run``
    closes the trainer, so a process that trains one model after another does not keep every engine (and its GPU
    memory). The engine still runs forward after the run."""
    import gc
    import weakref

    from mthl_ds.config import load_recipe
    from mthl_ds.tasks import fake_batch
    from mthl_ds.train import Trainer
    recipe = load_recipe("demo", demo_overrides(shards, ep_size=1, steps=1, ds_config="zero2_fp32.json"))
    trainer = Trainer(recipe, tmp_path / "run")
    trainer.run()
    trainer.model.set_dataset("imagenet")
    with torch.no_grad():
        logits = trainer.engine(fake_batch(recipe, "imagenet")["image"])
    assert logits.shape[0] == recipe.datasets["imagenet"].batch_size and torch.isfinite(logits).all()
    engine, model = weakref.ref(trainer.engine), weakref.ref(trainer.model)
    del trainer
    gc.collect()
    assert engine() is None and model() is None


def test_nonfinite_loss_on_one_rank_is_seen_by_all(shards, tmp_path):
    run_ranks("trainer_ranks.py", 2, ["nonfinite", str(shards), str(tmp_path)])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["skip"] == {"skipped": [3], "finite": True, "same_on_ranks": True}
    for message in summary["stop"]:  # both ranks stop, with the step and dataset named
        assert "non-finite loss at step 3 on dataset" in message and "rank(s) [1]" in message


def run_train(args, env=None, timeout=120):
    """`python -m mthl_ds.train` as a user starts it: no launcher variables unless the test gives some."""
    base = launcher_free_env()
    return subprocess.run([sys.executable, "-m", "mthl_ds.train", "--recipe", "demo", *args], capture_output=True,
                          text=True, timeout=timeout, env=dict(base, **(env or {})))


@pytest.mark.parametrize("extra,env,message", [
    (["--set", "train.bogus=1"], {}, "unknown key(s) ['bogus']"),
    (["--set", "train.ds_config={z3}", "--set", "model.moe.top_k=2"], {}, "ZeRO stage 3 cannot be used with MoE"),
    (["--set", "train.ds_config={batch}", "--set", "train.ep_size=1"], {}, "train_batch_size is set at run time"),
    # a world of 3 ranks that never come: creating the process group would hang, so the check must come first
    ([], {"WORLD_SIZE": "3", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"},
     "train.ep_size=2 does not divide the world size 3"),
    (["--set", "datasets.coco.num_classes=5", "--set", "train.ep_size=1"], {}, "datasets.coco.num_classes=5 but"),
])
def test_config_errors_fail_before_any_process_group(shards, tmp_path, extra, env, message):
    (tmp_path / "z3.json").write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    (tmp_path / "batch.json").write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_batch_size": 7}))
    extra = [a.format(z3=tmp_path / "z3.json", batch=tmp_path / "batch.json") for a in extra]
    start = time.time()
    proc = run_train(["--out", str(tmp_path / "run"), "--set", f"train.data_root={shards}", *extra], env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr
    assert not (tmp_path / "run").exists(), "nothing may be written before the checks pass"
    assert time.time() - start < 60


def test_plain_python_single_rank_run_and_refused_resume(shards, tmp_path):
    """`python -m mthl_ds.train` with no launcher is one rank (here with dropless dispatch, whose experts' backend
    the run names); a changed model cannot resume its folder."""
    args = ["--out", str(tmp_path / "run")] + [a for o in demo_overrides(shards, steps=2, ckpt_every=2, ep_size=1)
                                              for a in ("--set", o)] + ["--set", "model.moe.dispatch=dropless"]
    proc = run_train(args, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MoE dispatch: dropless (experts: looped)" in proc.stdout
    launch = json.loads((tmp_path / "run" / "launch" / "rank0.json").read_text())
    assert launch["world"] == 1 and launch["moe_dispatch"] == "dropless (experts: looped)"
    assert (tmp_path / "run" / "final_metrics.json").is_file()
    proc = run_train(args + ["--set", "model.moe.top_k=2"], timeout=300)
    assert proc.returncode == 2
    assert "written by a different model; refusing to resume" in proc.stderr
    assert "model.moe.top_k: checkpoint has 4, recipe has 2" in proc.stderr


FORK_ORDER = """
import json, multiprocessing, sys
import mthl_ds.train as train
from mthl_ds.config import load_recipe
seen = {}
build = train.build_run_model
def recording(*args, **kwargs):
    seen["before_model"] = sorted(p.pid for p in multiprocessing.active_children())
    return build(*args, **kwargs)
train.build_run_model = recording
trainer = train.Trainer(load_recipe("demo", sys.argv[2:]), sys.argv[1])
trainer.setup()
next(trainer.loaders["coco"])
print(json.dumps({**seen, "after_setup": sorted(p.pid for p in multiprocessing.active_children())}))
"""


def test_loader_workers_are_forked_before_the_model_exists(shards, tmp_path):
    """A worker forked after the engine shares its pages copy-on-write and keeps a copy of each one the optimizer
    writes; the training loaders' workers (one per dataset here) must all exist before the model is built."""
    overrides = demo_overrides(shards, workers=1, ep_size=1)
    proc = subprocess.run([sys.executable, "-c", FORK_ORDER, str(tmp_path / "run"), *overrides], capture_output=True,
                          text=True, timeout=300, env=launcher_free_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    pids = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(pids["after_setup"]) == 3, pids
    assert set(pids["after_setup"]) <= set(pids["before_model"]), pids

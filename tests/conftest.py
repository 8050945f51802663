import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
WORKERS = Path(__file__).resolve().parent / "workers"
os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")

from mthl_ds.runtime.engine import free_port  # noqa: E402,F401  (tests import it from here)


def pytest_collection_modifyitems(config, items):
    """``cuda`` tests are collected everywhere and skipped, with the reason, where CUDA is not available."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False on this machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def pytest_runtest_logstart(nodeid, location):
    record_outcome({"test": nodeid, "outcome": "started"})


def pytest_runtest_logreport(report):
    """With ``MTHL_TEST_OUTCOMES`` set (``make gpu-check``), each test's start and outcome as JSON lines, written as
    they happen: a run killed at its time limit still shows what passed, what failed and what was running."""
    if report.when == "call" or report.outcome != "passed":
        if isinstance(report.longrepr, tuple):  # a skip: (file, line, "Skipped: reason")
            message = report.longrepr[2].removeprefix("Skipped: ")
        else:  # a failure: its exception's line, as pytest's short summary shows it
            crash = getattr(report.longrepr, "reprcrash", None)
            message = crash.message if crash is not None else (report.longreprtext.strip().splitlines() or [""])[-1]
        record_outcome({"test": report.nodeid, "when": report.when, "outcome": report.outcome,
                        "seconds": round(report.duration, 2), "message": message[:300]})


def record_outcome(line: dict) -> None:
    path = os.environ.get("MTHL_TEST_OUTCOMES")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(line) + "\n")


def run_ranks(worker: str, nprocs: int, args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``tests/workers/<worker>`` on ``nprocs`` local gloo ranks with torchrun; fail with its output."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nprocs}",
           f"--master_port={free_port()}", str(WORKERS / worker), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        pytest.fail(
            f"{worker} on {nprocs} ranks failed (rc {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def train_cli(run_dir: Path, overrides: list[str], nprocs: int = 2, timeout: int = 600,
              recipe: str = "demo") -> subprocess.CompletedProcess:
    """``mthl-ds train`` (as ``python -m mthl_ds train``) on ``nprocs`` torchrun ranks; fails with its output."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nprocs}", f"--master_port={free_port()}",
           "-m", "mthl_ds", "train", "--recipe", recipe, "--out", str(run_dir)]
    for o in overrides:
        cmd += ["--set", o]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    """The synthetic world at a quarter of the demo's size, converted with the real converters."""
    from mthl_ds.data.convert import convert_world
    from mthl_ds.studies.synth import write_world
    root = tmp_path_factory.mktemp("synthetic")
    convert_world(write_world(root / "raw", seed=1, scale=0.25), root / "shards", shard_size=8,
                  progress=lambda _: None)
    return root / "shards"


def demo_overrides(shards: Path, **train) -> list[str]:
    """The demo recipe on the test shards, small and fast; ``train`` overrides train.* values."""
    values = {"data_root": str(shards), "workers": 0, "steps": 8, "warmup_steps": 2, "ckpt_every": 0,
              "log_every": 1, **train}
    return [f"train.{k}={v}" for k, v in values.items()] + [
        "datasets.imagenet.batch_size=4", "datasets.coco.batch_size=2", "datasets.ade20k.batch_size=2",
        "datasets.imagenet.eval_batch_size=8", "datasets.coco.eval_batch_size=4", "datasets.ade20k.eval_batch_size=4"]

"""slurm/train.sbatch on a real one-node Slurm (slurm/local_cluster.sh), and the multi-node launch on loopback.

The three jobs train the same short demo recipe with the same seed on 2 CPU ranks, so their final weights
must be equal: uninterrupted; preempted by Slurm's warning signal and requeued; hard-killed and resubmitted.
"""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, free_port
from test_training import checkpoint_tensors

from mthl_ds.engine import launcher_free_env

STEPS, EVERY = 60, 20
CLUSTER = ROOT / "slurm" / "local_cluster.sh"


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    proc = subprocess.run(["bash", str(CLUSTER), "up"], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.skip(f"a local Slurm could not start here: {proc.stderr[-500:]}")
    conf = subprocess.run(["bash", str(CLUSTER), "env"], capture_output=True, text=True).stdout.split("=", 1)[1]
    # jobs get this process's environment (sbatch --export=ALL); keep out the rendezvous of in-process tests
    yield dict(launcher_free_env(), SLURM_CONF=conf.strip())
    if "started slurmctld" in proc.stderr:  # leave a cluster that was already running as it was
        subprocess.run(["bash", str(CLUSTER), "down"], capture_output=True, timeout=120)


def sbatch(env, run_dir, shards):
    settings = f"train.data_root={shards} train.steps={STEPS} train.ckpt_every={EVERY} train.workers=1 " \
               "train.keep_checkpoints=5"
    job_env = dict(env, RECIPE="demo", RUN_DIR=str(run_dir), RANKS_PER_NODE="2", VENV=sys.prefix, MTHL_SET=settings)
    run_dir.mkdir(parents=True, exist_ok=True)
    out = subprocess.run(["sbatch", "--parsable", "--nodes=1", "--gpus-per-node=0", "--cpus-per-task=2",
                          "--partition=debug", "--time=30", f"--output={run_dir}/slurm-%j.out", "slurm/train.sbatch"],
                         cwd=ROOT, env=job_env, capture_output=True, text=True, check=True)
    return out.stdout.strip().split(";")[0]


def job_field(env, job, field):
    text = subprocess.run(["scontrol", "show", "job", job, "-o"], env=env, capture_output=True, text=True).stdout
    for part in text.split():
        if part.startswith(field + "="):
            return part.split("=", 1)[1]
    return ""


def wait_for(env, job, run_dir, timeout=900):
    """Wait for the job to end. A requeued job waits for a begin time Slurm sets (~2 min); start it sooner. Not
    at once: slurmd refuses a job whose credential is from the second its previous run's was revoked in
    ("Killing non-startable batch JobId: Job credential revoked"), which a start within a second hits."""
    deadline = time.time() + timeout
    held_since = None
    while time.time() < deadline:
        state = job_field(env, job, "JobState")
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return state
        if state == "PENDING" and job_field(env, job, "Reason") == "BeginTime":
            held_since = held_since or time.time()
            if time.time() - held_since > 3:
                subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=env, capture_output=True)
        else:
            held_since = None
        time.sleep(1)
    raise AssertionError(f"job {job} still {state} after {timeout} s; log: {list(run_dir.glob('slurm-*.out'))}")


def steps_logged(run_dir):
    path = run_dir / "metrics.jsonl"
    return sum('"loss"' in line for line in path.read_text().splitlines()) if path.exists() else 0


def wait_steps(run_dir, count, timeout=600):
    deadline = time.time() + timeout
    while steps_logged(run_dir) < count:
        assert time.time() < deadline, f"{run_dir} logged {steps_logged(run_dir)} steps"
        time.sleep(0.5)


def final_weights(run_dir):
    tag = (run_dir / "checkpoints" / "latest_complete").read_text().strip()
    assert tag == f"step{STEPS:08d}"
    return checkpoint_tensors(run_dir / "checkpoints" / tag)


@pytest.fixture(scope="module")
def uninterrupted(slurm, shards, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("slurm") / "straight"
    job = sbatch(slurm, run_dir, shards)
    assert wait_for(slurm, job, run_dir) == "COMPLETED", (run_dir / f"slurm-{job}.out").read_text()[-3000:]
    return run_dir, job


def test_sbatch_job_completes_with_checkpoint_and_metrics(uninterrupted):
    run_dir, job = uninterrupted
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert set(final) == {"imagenet", "coco", "ade20k"}
    assert (run_dir / "checkpoints" / "latest_complete").read_text().strip() == f"step{STEPS:08d}"
    logs = run_dir / "logs" / f"job-{job}-restart-0"
    assert (logs / "hostfile").read_text().split() == [os.uname().nodename.split(".")[0], "slots=2"]
    assert (logs / "node-0.log").is_file()
    ranks = [json.loads((run_dir / "launch" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["RANK"], r["WORLD_SIZE"], r["SLURM_JOB_ID"]) for r in ranks] == [("0", "2", job), ("1", "2", job)]


def test_preempted_job_checkpoints_requeues_and_matches(slurm, shards, uninterrupted, tmp_path):
    run_dir = tmp_path / "preempted"
    job = sbatch(slurm, run_dir, shards)
    wait_steps(run_dir, EVERY + 5)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm, check=True)
    assert wait_for(slurm, job, run_dir) == "COMPLETED"
    log = (run_dir / f"slurm-{job}.out").read_text()
    assert "warning signal" in log and "requeueing" in log and "(restart 1)" in log
    resumed = json.loads((run_dir / "launch" / "rank0.json").read_text())
    assert resumed["SLURM_RESTART_COUNT"] == "1" and EVERY + 5 <= resumed["start_step"] < STEPS
    print(f"preempted job {job} resumed at step {resumed['start_step']}")
    expected = final_weights(uninterrupted[0])
    got = final_weights(run_dir)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_hard_kill_resumes_from_last_complete_checkpoint(slurm, shards, uninterrupted, tmp_path):
    run_dir = tmp_path / "killed"
    job = sbatch(slurm, run_dir, shards)
    wait_steps(run_dir, EVERY + 5)
    subprocess.run(["scancel", "--signal=KILL", job], env=slurm, check=True)
    wait_for(slurm, job, run_dir)
    ckpts = run_dir / "checkpoints"
    tag = (ckpts / "latest_complete").read_text().strip()
    assert tag == f"step{EVERY:08d}" and (ckpts / tag / "run.json").is_file()
    # what a kill in the middle of a save leaves behind: files of a later step, no run.json, pointer not moved
    half = ckpts / f"step{2 * EVERY:08d}"
    shutil.copytree(ckpts / tag, half, dirs_exist_ok=True)
    (half / "run.json").unlink()
    (half / "mp_rank_00_model_states.pt").write_bytes(b"truncated")
    job2 = sbatch(slurm, run_dir, shards)
    assert wait_for(slurm, job2, run_dir) == "COMPLETED", (run_dir / f"slurm-{job2}.out").read_text()[-3000:]
    resumed = json.loads((run_dir / "launch" / "rank0.json").read_text())
    assert resumed["SLURM_JOB_ID"] == job2 and resumed["start_step"] == EVERY
    expected = final_weights(uninterrupted[0])
    got = final_weights(run_dir)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_two_nodes_on_loopback(shards, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    port = str(free_port())
    procs = []
    for node in (0, 1):
        env = dict(os.environ, HOSTFILE=str(hostfile), NODE_RANK=str(node), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                   RECIPE="demo", RUN_DIR=str(tmp_path / "run"), PYTHON=sys.executable, OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen(["bash", "slurm/launch_node.sh", "--set", f"train.data_root={shards}",
                                       "--set", "train.steps=6", "--set", "train.workers=0"], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    ranks = [json.loads((tmp_path / "run" / "launch" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["rank"], r["world"], r["RANK"], r["LOCAL_RANK"], r["CROSS_RANK"], r["CROSS_SIZE"]) for r in ranks] == [
        (0, 2, "0", "0", "0", "2"), (1, 2, "1", "0", "1", "2")]
    assert (tmp_path / "run" / "final_metrics.json").is_file()


def submit(env, args):
    proc = subprocess.run(["sbatch", "--parsable", "--gpus-per-node=0", "--cpus-per-task=2", "--partition=debug",
                           "--time=30", *args], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def test_export_and_adapt_jobs_chain(slurm, shards, uninterrupted):
    """export.sbatch on the finished run, then adapt.sbatch waiting on it (a Slurm dependency)."""
    run_dir, _ = uninterrupted
    env = dict(slurm, RUN_DIR=str(run_dir), VENV=sys.prefix)
    export_job = submit(env, [f"--output={run_dir}/export-%j.out", "slurm/export.sbatch"])
    out = run_dir.parent / "pets-routers"
    adapt_env = dict(env, MODEL=str(run_dir / "model.safetensors"), DATA=str(shards / "pets"), DATASET="pets",
                     OUT=str(out), ADAPT_ARGS="--steps 4 --workers 0 --batch-size 4")
    adapt_job = submit(adapt_env, [f"--dependency=afterok:{export_job}", f"--output={run_dir}/adapt-%j.out",
                                   "slurm/adapt.sbatch"])
    assert wait_for(slurm, export_job, run_dir) == "COMPLETED", (run_dir / f"export-{export_job}.out").read_text()
    assert wait_for(slurm, adapt_job, run_dir) == "COMPLETED", (run_dir / f"adapt-{adapt_job}.out").read_text()[-3000:]
    from mthl_ds.export import read_metadata
    meta = read_metadata(run_dir / "model.safetensors")
    assert meta["source"]["step"] == STEPS and meta["source"]["world_size"] == 2
    result = json.loads((out / "result.json").read_text())
    assert result["mode"] == "routers" and result["dataset"] == "pets" and 0 < result["trainable_params"] < 200_000

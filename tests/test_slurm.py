"""slurm/train.sbatch on a real two-node Slurm: `slurm/local_cluster.sh up --nodes 2` runs two slurmd on this
machine, each with its own hostname (mthl-node0, mthl-node1) and loopback address.

Every training job runs the same short demo recipe (ep_size 2 with expert-data-parallel 2, ZeRO 2, LAMB) with the
same seed on 4 CPU ranks, as 2 nodes x 2 ranks or 1 node x 4 ranks, so their final weights must be equal:
uninterrupted on either layout; preempted by Slurm's warning signal and requeued; resubmitted after node 1's ranks
were killed. A lost node, a hung node and a node that never starts its ranks end the job within FAILURE_BOUND_S.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT
from test_training import checkpoint_tensors

from mthl_ds.runtime.engine import launcher_free_env

STEPS, EVERY, RANKS = 24, 8, 4
COLLECTIVE_TIMEOUT_S = 30  # train.collective_timeout_s in these jobs (600 s by default)
# How long a job may take to end once a node fails. A rank killed: its node's launcher notices within 1 s and exits,
# srun (--kill-on-bad-exit) then stops the other node's task, SIGKILL after Slurm's KillWait (10 s here). A hung
# node: its peers raise after the collective timeout, then the same. 30 s of slack for a loaded 2-core machine.
FAILURE_BOUND_S = COLLECTIVE_TIMEOUT_S + 10 + 30
CLUSTER = ROOT / "slurm" / "local_cluster.sh"
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def slurm_daemons():
    """Running (not zombie) slurmd / slurmctld processes."""
    ps = subprocess.run(["ps", "-eo", "stat=,comm="], capture_output=True, text=True).stdout.split("\n")
    return [line for line in ps if line.split()[1:] in (["slurmd"], ["slurmctld"]) and not line.startswith("Z")]


@pytest.fixture(scope="module")
def slurm():
    hosts_before = open("/etc/hosts").read()
    proc = subprocess.run(["bash", str(CLUSTER), "up", "--nodes", "2"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"the local 2-node Slurm did not start: {proc.stderr[-2000:]}"
    conf = subprocess.run(["bash", str(CLUSTER), "env"], capture_output=True, text=True).stdout.split("=", 1)[1]
    # jobs get this process's environment (sbatch --export=ALL); keep out the rendezvous of in-process tests
    yield dict(launcher_free_env(), SLURM_CONF=conf.strip())
    if "started slurmctld" in proc.stderr:  # leave a cluster that was already running as it was
        down = subprocess.run(["bash", str(CLUSTER), "down"], capture_output=True, text=True, timeout=120)
        # `down` removes exactly what `up` made: daemons, hosts lines, its folder
        assert down.returncode == 0, down.stderr
        assert open("/etc/hosts").read() == hosts_before and not slurm_daemons()
        assert not os.path.exists(os.path.dirname(conf.strip()))


def sbatch(env, run_dir, shards, nodes, **extra_env):
    settings = (f"train.data_root={shards} train.steps={STEPS} train.ckpt_every={EVERY} train.workers=0 "
                f"train.warmup_steps=2 train.log_every=1 train.keep_checkpoints=5 "
                f"train.collective_timeout_s={COLLECTIVE_TIMEOUT_S} datasets.imagenet.batch_size=4 "
                "datasets.coco.batch_size=2 datasets.ade20k.batch_size=2 datasets.imagenet.eval_batch_size=8 "
                "datasets.coco.eval_batch_size=4 datasets.ade20k.eval_batch_size=4")
    job_env = dict(env, RECIPE="demo", RUN_DIR=str(run_dir), RANKS_PER_NODE=str(RANKS // nodes), VENV=sys.prefix,
                   MTHL_SET=settings, **extra_env)
    run_dir.mkdir(parents=True, exist_ok=True)
    out = subprocess.run(["sbatch", "--parsable", f"--nodes={nodes}", "--gpus-per-node=0", "--cpus-per-task=2",
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
        if state in ENDED:
            return state
        if state == "PENDING" and job_field(env, job, "Reason") == "BeginTime":
            held_since = held_since or time.time()
            if time.time() - held_since > 3:
                subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=env, capture_output=True)
        else:
            held_since = None
        time.sleep(0.5)
    raise AssertionError(f"job {job} still {state} after {timeout} s; log: {list(run_dir.glob('slurm-*.out'))}")


def job_log(run_dir, job):
    return (run_dir / f"slurm-{job}.out").read_text()


def steps_logged(run_dir):
    path = run_dir / "metrics.jsonl"
    return sum('"loss"' in line for line in path.read_text().splitlines()) if path.exists() else 0


def wait_steps(run_dir, count, timeout=600):
    deadline = time.time() + timeout
    while steps_logged(run_dir) < count:
        assert time.time() < deadline, f"{run_dir} logged {steps_logged(run_dir)} steps"
        time.sleep(0.2)


def launch_records(run_dir):
    return [json.loads((run_dir / "launch" / f"rank{r}.json").read_text()) for r in range(RANKS)]


def node_pids(run_dir, job, host):
    """The training ranks of ``job`` on ``host``, from their launch records."""
    records = [r for r in launch_records(run_dir) if r["SLURM_JOB_ID"] == job]
    assert len(records) == RANKS, f"{RANKS - len(records)} ranks of job {job} have not started"
    return [r["pid"] for r in records if r["host"] == host]


def alive(pid):
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def wait_ended(env, job, run_dir, pids, since):
    """Seconds from ``since`` until the job has ended and none of ``pids`` is left (the job can end while Slurm
    still waits KillWait to SIGKILL a rank that took SIGTERM as a request to checkpoint)."""
    state = wait_for(env, job, run_dir, timeout=FAILURE_BOUND_S + 60)
    while any(alive(pid) for pid in pids) and time.time() - since < FAILURE_BOUND_S + 60:
        time.sleep(0.2)
    assert not any(alive(pid) for pid in pids), f"ranks {[p for p in pids if alive(p)]} outlived job {job}"
    return state, time.time() - since


def final_weights(run_dir):
    tag = (run_dir / "checkpoints" / "latest_complete").read_text().strip()
    assert tag == f"step{STEPS:08d}"
    return checkpoint_tensors(run_dir / "checkpoints" / tag)


def assert_same_weights(run_dir, reference_dir):
    expected, got = final_weights(reference_dir), final_weights(run_dir)
    assert expected.keys() == got.keys()
    differing = [k for k in expected if not torch.equal(got[k], expected[k])]
    assert not differing, f"{len(differing)} tensors differ from {reference_dir}, e.g. {differing[:3]}"


def completed_job(slurm, run_dir, shards, nodes):
    job = sbatch(slurm, run_dir, shards, nodes)
    assert wait_for(slurm, job, run_dir) == "COMPLETED", job_log(run_dir, job)[-3000:]
    return run_dir, job


@pytest.fixture(scope="module")
def two_nodes(slurm, shards, tmp_path_factory):
    return completed_job(slurm, tmp_path_factory.mktemp("slurm") / "two-nodes", shards, nodes=2)


@pytest.fixture(scope="module")
def one_node(slurm, shards, tmp_path_factory):
    return completed_job(slurm, tmp_path_factory.mktemp("slurm") / "one-node", shards, nodes=1)


def test_two_node_job_places_ranks_on_both_nodes(two_nodes):
    run_dir, job = two_nodes
    logs = run_dir / "logs" / f"job-{job}-restart-0"
    assert (logs / "hostfile").read_text().splitlines() == ["mthl-node0 slots=2", "mthl-node1 slots=2"]
    assert [(logs / f"node-{n}.rc").read_text().strip() for n in (0, 1)] == ["0", "0"]
    placed = [(r["rank"], r["world"], r["host"], r["SLURM_NODEID"], r["CROSS_RANK"], r["LOCAL_RANK"], r["MASTER_ADDR"])
              for r in launch_records(run_dir)]
    assert placed == [(0, 4, "mthl-node0", "0", "0", "0", "mthl-node0"),
                      (1, 4, "mthl-node0", "0", "0", "1", "mthl-node0"),
                      (2, 4, "mthl-node1", "1", "1", "0", "mthl-node0"),
                      (3, 4, "mthl-node1", "1", "1", "1", "mthl-node0")]
    assert all(r["SLURM_JOB_ID"] == job and r["end_step"] == STEPS for r in launch_records(run_dir))
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert set(final) == {"imagenet", "coco", "ade20k"}


def test_two_nodes_equal_one_node_bitwise(two_nodes, one_node, tmp_path):
    """2 nodes x 2 ranks and 1 node x 4 ranks: the same checkpoint and the same export, bit for bit."""
    from safetensors.torch import load_file

    from mthl_ds.artifacts.export import export_run
    assert len({r["host"] for r in launch_records(one_node[0])}) == 1
    assert_same_weights(two_nodes[0], one_node[0])
    exports = [load_file(export_run(run_dir, tmp_path / f"{i}.safetensors")) for i, (run_dir, _) in
               enumerate((two_nodes, one_node))]
    assert exports[0].keys() == exports[1].keys()
    assert all(torch.equal(exports[0][k], exports[1][k]) for k in exports[0])


def test_preempted_two_node_job_stops_together_requeues_and_matches(slurm, shards, two_nodes, tmp_path):
    run_dir = tmp_path / "preempted"
    job = sbatch(slurm, run_dir, shards, nodes=2)
    wait_steps(run_dir, EVERY + 3)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm, check=True)
    assert wait_for(slurm, job, run_dir) == "COMPLETED", job_log(run_dir, job)[-3000:]
    log = job_log(run_dir, job)
    assert "warning signal" in log and "requeueing" in log and "(restart 1)" in log
    # the signal reached the batch script on node 0; every rank on both nodes stopped and saved at the same step
    first = run_dir / "logs" / f"job-{job}-restart-0"
    stops = {}
    for node in (0, 1):
        assert (first / f"node-{node}.rc").read_text().strip() == "75"
        for rank, host, step in re.findall(r"rank (\d) on (\S+): stop requested, checkpoint saved at step (\d+)",
                                           (first / f"node-{node}.log").read_text()):
            assert host == f"mthl-node{node}"
            stops[int(rank)] = int(step)
    assert sorted(stops) == [0, 1, 2, 3] and len(set(stops.values())) == 1, stops
    stopped_at = stops[0]
    resumed = launch_records(run_dir)
    assert {r["host"] for r in resumed} == {"mthl-node0", "mthl-node1"}
    assert all(r["SLURM_RESTART_COUNT"] == "1" and r["start_step"] == stopped_at for r in resumed)
    assert EVERY + 3 <= stopped_at < STEPS
    print(f"preempted job {job}: every rank stopped at step {stopped_at}, resumed on both nodes")
    assert_same_weights(run_dir, two_nodes[0])


def test_lost_node_ends_the_job_and_a_resubmission_matches(slurm, shards, two_nodes, tmp_path):
    run_dir = tmp_path / "lost-node"
    job = sbatch(slurm, run_dir, shards, nodes=2)
    wait_steps(run_dir, EVERY + 3)
    survivors = node_pids(run_dir, job, "mthl-node0")
    killed_at = time.time()
    for pid in node_pids(run_dir, job, "mthl-node1"):
        os.kill(pid, signal.SIGKILL)
    state, took = wait_ended(slurm, job, run_dir, survivors, killed_at)
    print(f"job {job} and its ranks ended {took:.1f} s after node 1's ranks were killed ({state})")
    assert state == "FAILED" and took <= FAILURE_BOUND_S
    assert re.search(r"node 1 \(mthl-node1\) failed with exit code \d+", job_log(run_dir, job))
    tag = (run_dir / "checkpoints" / "latest_complete").read_text().strip()
    assert tag in (f"step{EVERY:08d}", f"step{2 * EVERY:08d}")
    job2 = sbatch(slurm, run_dir, shards, nodes=2)
    assert wait_for(slurm, job2, run_dir) == "COMPLETED", job_log(run_dir, job2)[-3000:]
    assert all(r["SLURM_JOB_ID"] == job2 and r["start_step"] == int(tag[4:]) for r in launch_records(run_dir))
    assert_same_weights(run_dir, two_nodes[0])


def test_hung_node_ends_the_job_within_the_collective_timeout(slurm, shards, tmp_path):
    """Node 1's ranks stopped (SIGSTOP), not dead: nobody exits, so only the collective timeout frees node 0."""
    run_dir = tmp_path / "hung-node"
    job = sbatch(slurm, run_dir, shards, nodes=2)
    wait_steps(run_dir, 3)
    ranks = node_pids(run_dir, job, "mthl-node0") + node_pids(run_dir, job, "mthl-node1")
    hung_at = time.time()
    for pid in ranks[2:]:
        os.kill(pid, signal.SIGSTOP)
    state, took = wait_ended(slurm, job, run_dir, ranks, hung_at)
    print(f"job {job} and its ranks ended {took:.1f} s after node 1's ranks hung ({state})")
    assert state == "FAILED" and COLLECTIVE_TIMEOUT_S <= took <= FAILURE_BOUND_S
    logs = run_dir / "logs" / f"job-{job}-restart-0"
    assert "timed out" in (logs / "node-0.log").read_text().lower()
    assert re.search(r"node 0 \(mthl-node0\) failed with exit code \d+", job_log(run_dir, job))


def test_node_that_never_starts_its_ranks_fails_the_job_naming_it(slurm, shards, tmp_path):
    """Node 1 without a working environment: its launch script fails before any rank starts."""
    python = tmp_path / "python-broken-on-node1"
    python.write_text(f'#!/bin/sh\n[ "$(hostname)" = mthl-node1 ] && exit 1\nexec {sys.executable} "$@"\n')
    python.chmod(0o755)
    run_dir = tmp_path / "no-start"
    started = time.time()
    job = sbatch(slurm, run_dir, shards, nodes=2, PYTHON=str(python))
    state = wait_for(slurm, job, run_dir, timeout=FAILURE_BOUND_S + 60)
    took = time.time() - started
    log = job_log(run_dir, job)
    print(f"job {job} ended {took:.1f} s after submission ({state})")
    assert state == "FAILED" and took <= FAILURE_BOUND_S, log
    assert "node 1 (mthl-node1) failed with exit code 3" in log and "cannot import mthl_ds" in log
    assert not (run_dir / "launch").exists()


def test_collective_timeout_reaches_the_groups_deepspeed_makes():
    """DeepSpeed's ZeRO and expert groups come from new_group() without a timeout: they must get ours too."""
    code = ("from mthl_ds.runtime.engine import init_distributed; import torch, torch.distributed as dist; "
            "init_distributed(42); g = dist.new_group([0]); "
            "print(g._get_backend(torch.device('cpu')).options._timeout.total_seconds())")
    out = subprocess.run([sys.executable, "-c", code], env=launcher_free_env(), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "42.0"


def submit(env, args):
    proc = subprocess.run(["sbatch", "--parsable", "--gpus-per-node=0", "--cpus-per-task=2", "--partition=debug",
                           "--time=30", *args], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def test_export_and_adapt_jobs_chain(slurm, shards, two_nodes):
    """export.sbatch on the finished run, then adapt.sbatch waiting on it (a Slurm dependency)."""
    run_dir, _ = two_nodes
    env = dict(slurm, RUN_DIR=str(run_dir), VENV=sys.prefix)
    export_job = submit(env, [f"--output={run_dir}/export-%j.out", "slurm/export.sbatch"])
    out = run_dir.parent / "pets-routers"
    adapt_env = dict(env, MODEL=str(run_dir / "model.safetensors"), DATA=str(shards / "pets"), DATASET="pets",
                     OUT=str(out), ADAPT_ARGS="--steps 4 --workers 0 --batch-size 4")
    adapt_job = submit(adapt_env, [f"--dependency=afterok:{export_job}", f"--output={run_dir}/adapt-%j.out",
                                   "slurm/adapt.sbatch"])
    assert wait_for(slurm, export_job, run_dir) == "COMPLETED", (run_dir / f"export-{export_job}.out").read_text()
    assert wait_for(slurm, adapt_job, run_dir) == "COMPLETED", (run_dir / f"adapt-{adapt_job}.out").read_text()[-3000:]
    from mthl_ds.artifacts.export import read_metadata
    meta = read_metadata(run_dir / "model.safetensors")
    assert meta["source"]["step"] == STEPS and meta["source"]["world_size"] == RANKS
    result = json.loads((out / "result.json").read_text())
    assert result["mode"] == "routers" and result["dataset"] == "pets" and 0 < result["trainable_params"] < 200_000

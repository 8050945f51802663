"""Checkpoints and exports a reader can trust: every checkpoint has a manifest (each file's size and xxh3-64),
written inside the atomic commit; a damaged file (bits flipped, truncated, deleted) is found before it is read.
A resume then falls back to the newest earlier checkpoint that verifies and ends bitwise equal to a run resumed
from there; export refuses, naming the file and the newest good step; ``mthl-ds verify`` tables a run; a damaged
export is refused; a save on a full disk leaves the previous checkpoint and the pointer as they were."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, demo_overrides, train_cli

from mthl_ds.artifacts import manifest
from mthl_ds.artifacts.checkpoint import consolidate
from mthl_ds.artifacts.export import load_export, save_export
from mthl_ds.build import build_model
from mthl_ds.config import load_recipe, recipe_to_dict
from mthl_ds.errors import ExportError
from mthl_ds.runtime.engine import launcher_free_env

STEP4, STEP8 = "step00000004", "step00000008"
KINDS = {"model states": "mp_rank_00_model_states.pt", "an expert file": "layer_2_expert_5_mp_rank_00_model_states.pt",
         "an optimizer shard": "expp_rank_1_mp_rank_00_optim_states.pt"}


def flip(path: Path) -> None:
    """64 bytes in the middle of the file inverted: same size, other content."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:1000])


def delete(path: Path) -> None:
    path.unlink()


FAULTS = {"flip": flip, "truncate": truncate, "delete": delete}


def optimizer_shard(folder: Path) -> str:
    """An optimizer shard of the second rank, whatever DeepSpeed names it for the ZeRO stage."""
    return next(p.name for p in sorted(folder.glob("*rank_1*optim_states.pt")))


def checkpoint_tensors(ckpt: Path) -> dict:
    tensors = dict(torch.load(ckpt / "mp_rank_00_model_states.pt", weights_only=False)["module"])
    for f in sorted(ckpt.glob("layer_*_expert_*_model_states.pt")):
        tensors.update(torch.load(f, weights_only=False))
    return tensors


def mthl_ds(args: list) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mthl_ds", *map(str, args)], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=600)


def test_a_manifest_names_each_fault_with_what_was_expected_and_found(tmp_path):
    (tmp_path / "a.pt").write_bytes(os.urandom(5000))
    (tmp_path / "b.pt").write_bytes(os.urandom(3000))
    (tmp_path / "c.pt").write_bytes(os.urandom(100))
    written = manifest.describe(tmp_path, manifest.step_files(tmp_path))
    manifest.write(tmp_path, written, step=4)
    assert manifest.verify(tmp_path, manifest.read(tmp_path)) == []
    flip(tmp_path / "a.pt")
    truncate(tmp_path / "b.pt")
    delete(tmp_path / "c.pt")
    problems = {p.file: p.what for p in manifest.verify(tmp_path, manifest.read(tmp_path))}
    a, b, c = written["a.pt"], written["b.pt"], written["c.pt"]
    assert problems["a.pt"].startswith(f"xxh3_64 expected {a['xxh3_64']}, found ") and "5000 bytes" in problems["a.pt"]
    assert problems["b.pt"] == f"expected 3000 bytes (xxh3_64 {b['xxh3_64']}), found 1000"
    assert problems["c.pt"] == f"missing (expected 100 bytes, xxh3_64 {c['xxh3_64']})"
    # ranks that split the reading find the same problems between them
    shares = [manifest.verify(tmp_path, manifest.read(tmp_path), (r, 2)) for r in (0, 1)]
    assert sorted(p.file for share in shares for p in share) == ["a.pt", "b.pt", "c.pt"]


def test_an_export_carries_a_checksum_and_a_damaged_one_is_refused(tmp_path, caplog):
    recipe = load_recipe("demo", ["datasets.coco.head_channels=16", "datasets.ade20k.head_channels=16"])
    path = save_export(tmp_path / "model.safetensors", build_model(recipe), {"kind": "test"}, recipe_to_dict(recipe))
    model, meta = load_export(path)
    assert meta["checksum"]["algorithm"] == "xxh3_64" and len(meta["checksum"]["tensors"]) == 16
    header = 8 + int.from_bytes(path.read_bytes()[:8], "little")  # safetensors: length, JSON header, tensor bytes
    data = bytearray(path.read_bytes())
    data[header + 1000:header + 1064] = bytes(b ^ 0xFF for b in data[header + 1000:header + 1064])
    path.write_bytes(bytes(data))
    with pytest.raises(ExportError, match=rf"{path}: damaged: its weights do not match the checksum"):
        load_export(path)
    legacy = ROOT / "tests" / "data" / "export_main_e6a8d9f.safetensors"  # written before exports had a checksum
    with caplog.at_level("WARNING"):
        load_export(legacy)
    assert "carries no checksum" in caplog.text


@pytest.fixture(scope="module")
def straight(shards, tmp_path_factory):
    """A 2-rank run of 8 steps with checkpoints at steps 4 and 8 (ZeRO 2, ep_size 2)."""
    run_dir = tmp_path_factory.mktemp("integrity") / "straight"
    overrides = demo_overrides(shards, steps=8, ckpt_every=4, keep_checkpoints=3, ds_config="zero2_fp32.json")
    train_cli(run_dir, overrides)
    return run_dir, overrides


def test_every_file_of_a_checkpoint_is_in_its_manifest_and_verify_says_ok(straight):
    run_dir, _ = straight
    for tag in (STEP4, STEP8):
        folder = run_dir / "checkpoints" / tag
        listed = manifest.read(folder)["files"]
        assert set(listed) == set(manifest.step_files(folder))  # model states, experts, optimizer shards, ranks
        assert {"mp_rank_00_model_states.pt", "run.json", "rank0_state.pt", "rank1_state.pt",
                KINDS["an expert file"], optimizer_shard(folder)} <= set(listed)
        assert all(entry["bytes"] == (folder / name).stat().st_size for name, entry in listed.items())
    proc = mthl_ds(["verify", run_dir])
    assert proc.returncode == 0, proc.stderr
    assert "| 4 | " in proc.stdout and "| 8 (latest_complete) | " in proc.stdout and proc.stdout.count("| ok |") == 2


def damage(run_dir: Path, kind: str, fault: str) -> str:
    folder = run_dir / "checkpoints" / STEP8
    name = optimizer_shard(folder) if kind == "an optimizer shard" else KINDS[kind]
    FAULTS[fault](folder / name)
    return name


@pytest.mark.parametrize("fault", sorted(FAULTS))
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_export_and_verify_refuse_a_damaged_checkpoint_naming_the_file_and_the_good_step(straight, tmp_path,
                                                                                         kind, fault):
    run_dir = tmp_path / "run"
    shutil.copytree(straight[0], run_dir)
    name = damage(run_dir, kind, fault)
    with pytest.raises(ExportError, match=rf"{STEP8} does not verify against its manifest.json: {name}: .*the "
                                          rf"newest checkpoint that verifies is {STEP4} \(step 4\)"):
        consolidate(run_dir)
    proc = mthl_ds(["export", run_dir, "--out", tmp_path / "model.safetensors"])
    assert proc.returncode == 2 and name in proc.stderr and "--step 4" in proc.stderr
    assert not (tmp_path / "model.safetensors").exists()
    proc = mthl_ds(["export", run_dir, "--out", tmp_path / "model.safetensors", "--step", 4])  # the good one
    assert proc.returncode == 0 and "step 4" in proc.stdout
    table = mthl_ds(["verify", run_dir])
    assert table.returncode == 1 and "| 8 (latest_complete) | " in table.stdout and \
        "| DAMAGED: " + name in table.stdout
    assert "| ok |" in table.stdout  # step 4


@pytest.mark.parametrize("kind, fault", [("model states", "flip"), ("an expert file", "flip"),
                                         ("an optimizer shard", "flip"), ("an expert file", "truncate"),
                                         ("an optimizer shard", "delete")])
def test_resume_falls_back_to_the_last_good_checkpoint_and_ends_as_a_run_resumed_from_it(straight, tmp_path,
                                                                                        kind, fault):
    """The straight run's step 8 is what a run resumed from step 4 ends with (resume is bitwise exact:
    tests/test_training.py), so a fallback to step 4 must end with exactly its weights."""
    original, overrides = straight
    run_dir = tmp_path / "run"
    shutil.copytree(original, run_dir)
    name = damage(run_dir, kind, fault)
    proc = train_cli(run_dir, overrides)
    assert f"{STEP8} does not verify against its manifest.json: {name}" in proc.stderr
    assert f"resuming from {STEP4} instead" in proc.stderr and "resumed from" in proc.stderr
    assert (run_dir / "checkpoints" / "damaged" / STEP8 / "manifest.json").is_file()  # kept, not deleted
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    fallback = [r for r in rows if r.get("kind") == "checkpoint"]
    assert len(fallback) == 1 and fallback[0]["checkpoint"]["resumed_from"] == STEP4
    assert fallback[0]["checkpoint"]["damaged"][0]["tag"] == STEP8 and \
        name in fallback[0]["checkpoint"]["damaged"][0]["problems"][0]
    a = checkpoint_tensors(original / "checkpoints" / STEP8)
    b = checkpoint_tensors(run_dir / "checkpoints" / STEP8)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((run_dir / "final_metrics.json").read_text()) == json.loads(
        (original / "final_metrics.json").read_text())


def test_a_run_written_before_manifests_still_loads_with_a_warning(straight, tmp_path):
    """A checkpoint of main before manifests: no manifest.json, and a run.json that does not say one was written
    (a checkpoint whose run.json says so and has none is damaged)."""
    run_dir = tmp_path / "run"
    shutil.copytree(straight[0], run_dir)
    (run_dir / "checkpoints" / STEP8 / "manifest.json").unlink()
    table = mthl_ds(["verify", run_dir])
    assert table.returncode == 1 and \
        "| DAMAGED: manifest.json: missing (run.json says one was written) |" in table.stdout
    for folder in (run_dir / "checkpoints").glob("step*"):
        (folder / "manifest.json").unlink(missing_ok=True)
        record = json.loads((folder / "run.json").read_text())
        del record["manifest"]
        (folder / "run.json").write_text(json.dumps(record))
    proc = mthl_ds(["export", run_dir, "--out", tmp_path / "model.safetensors"])
    assert proc.returncode == 0 and "step 8" in proc.stdout
    assert "has no manifest.json (written before checkpoints had one): reading it unverified" in proc.stderr
    table = mthl_ds(["verify", run_dir])
    assert table.returncode == 0 and table.stdout.count("no manifest (written before checkpoints had one)") == 2


DISK_FULL = """
set -u
mount -t tmpfs -o size={size} tmpfs {fs}
{python} -m deepspeed.launcher.runner --num_gpus 2 --master_port {port} --module mthl_ds train --recipe demo \
  --out {fs}/run {sets} > {out}/train.log 2>&1
echo $? > {out}/rc
ls {fs}/run/checkpoints > {out}/ls
cat {fs}/run/checkpoints/latest_complete > {out}/pointer
{python} -m mthl_ds verify {fs}/run > {out}/verify 2>&1
echo $? >> {out}/verify
"""


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux's unshare to mount a private tmpfs")
def test_a_save_on_a_full_disk_keeps_the_last_checkpoint_and_stops_every_rank(straight, shards, tmp_path):
    """The run folder on a tmpfs that holds one checkpoint and not two (in a private mount namespace, gone with
    the test): the step-8 save fails, the step-4 checkpoint and the pointer stay, the partial step folder goes,
    and the ranks exit with 74, naming the filesystem and the bytes a checkpoint needs."""
    from conftest import free_port
    one = sum(f.stat().st_size for f in (straight[0] / "checkpoints" / STEP4).iterdir())
    overrides = [o for o in demo_overrides(shards, steps=8, ckpt_every=4, keep_checkpoints=3)] + ["train.eval_every=0"]
    script = DISK_FULL.format(size=int(one * 1.5), fs=tmp_path / "fs", python=sys.executable, port=free_port(),
                              out=tmp_path, sets=" ".join(f"--set {o}" for o in overrides))
    (tmp_path / "fs").mkdir()
    proc = subprocess.run(["unshare", "-m", "bash", "-c", script], capture_output=True, text=True, timeout=900,
                          env=dict(launcher_free_env(), OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr
    log = (tmp_path / "train.log").read_text()
    assert (tmp_path / "rc").read_text().strip() == "74", log[-3000:]
    assert f"checkpoint {STEP8} not saved" in log and "No space left on device" in log
    assert f"filesystem {tmp_path / 'fs'} has" in log and "a checkpoint of this run takes" in log
    assert [n for n in (tmp_path / "ls").read_text().split() if n.startswith("step")] == [STEP4]  # no partial step
    assert (tmp_path / "pointer").read_text().strip() == STEP4
    verify = (tmp_path / "verify").read_text()
    assert "| 4 (latest_complete) | " in verify and "| ok |" in verify and verify.strip().endswith("0")


def test_the_integrity_benchmark_prints_its_figures():
    from mthl_ds.studies.bench.integrity import run
    rows = run(checkpoint_recipes=("demo",), export_recipe="demo", repeats=1, buffer_mib=1)
    assert [r["candidate"] for r in rows[:3]] == ["xxh3_64", "crc32 (zlib)", "blake2b"]
    assert all(r["figure"].endswith("GB/s") for r in rows[:3])
    assert rows[3]["benchmark"].startswith("demo checkpoint") and "manifest" in rows[3]["figure"]
    assert rows[4]["benchmark"].startswith("demo export") and "of which the checksum" in rows[4]["figure"]

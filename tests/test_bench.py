"""The benchmark suite's code path at tiny sizes: every row present with sane values (no time is asserted)."""
import json
import math
import platform
import subprocess
import sys

import pytest
from mthl_ds.runtime.engine import launcher_free_env
from mthl_ds.studies.bench.suite import COLUMNS


def test_bench_suite_smoke(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mthl_ds.cli", "bench", "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=launcher_free_env(),
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads((tmp_path / "bench_all.json").read_text())
    assert "| id | benchmark |" in proc.stdout and (tmp_path / "bench_all.md").read_text().count("\n") == len(rows) + 2
    ids = [r["id"] for r in rows]
    assert {"peak", "B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8"} <= set(ids)
    assert ids.count("B3") == ids.count("B8") == 3  # one per demo dataset
    for r in rows:
        assert set(COLUMNS) <= set(r)
        if r["ratio"] is not None:
            assert math.isfinite(r["ratio"]) and r["ratio"] > 0, r
        if r["target"]:
            assert isinstance(r["met"], bool), r
    by_id = {r["id"]: r for r in rows}
    assert 1e8 < by_id["peak"]["peak_flop_per_s"] < 1e14
    assert all(0 < r["mfu"] < 1 for r in rows if r["id"] == "B8")
    assert len(by_id["B7"]["max_rss"]) == 2 and all(m > 100 * 2 ** 20 for m in by_id["B7"]["max_rss"])
    assert "single_partition_of_fp32_groups" in by_id["B6"]["work"]  # ZeRO's own buffers were counted


def test_inference_bench_prints_batch_dependence_per_dispatch_choice(capsys):
    from mthl_ds.moe.layer import MoEMlp
    from mthl_ds.studies.bench.inference import main
    filled = MoEMlp.run_filled_slots
    main(["demo", "4", "--datasets", "imagenet", "--repeats", "1"])
    assert MoEMlp.run_filled_slots is filled  # the default path is restored
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in lines] == ["drop", "filled", "batched"]
    for line in lines[1:]:  # no route dropped: the image's output does not depend on its batch
        assert float(line.split("in batch| ")[1].split()[0]) < 1e-5, line


def test_large_image_bench_measures_each_candidate_in_its_own_process():
    """On a small photo: the floor, the banded and the whole-image resize each report a fresh process's peak
    (above what importing torch takes) and a time; a photo whose resized logits would not fit is not run, and
    says why."""
    from mthl_ds.studies.bench.large_image import machine_memory, run, too_large
    rows = run(classes=(4,), size=(300, 200))
    assert [r["candidate"] for r in rows] == ["floor", "banded", "whole image"]
    assert all(0.1 < r["peak_rss_gb"] < 8 and r["seconds"] > 0 for r in rows), rows
    assert too_large(4, (300, 200)) is None
    side = int(math.sqrt(machine_memory() / 16)) + 1  # 4 classes x side^2 float32 values: the whole memory
    assert "not run: its resized logits alone take" in too_large(4, (side, side))


BLOCK_FAULTS = """
import resource, sys, torch
from mthl_ds.runtime.host_memory import keep_freed_blocks
kept = keep_freed_blocks() if sys.argv[1] == "keep" else None
def faults_of_one_block():  # a 64 MiB tensor written and freed, as a step's activations are
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(64 << 20, dtype=torch.uint8).fill_(1)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(kept, [faults_of_one_block() for _ in range(12)][-1])  # the heap grows over the first few
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="keep_freed_blocks sets glibc's malloc; this C library is not glibc")
def test_a_bench_process_reuses_large_freed_blocks_instead_of_faulting_them_in_again():
    """With glibc's defaults every 64 MiB block is mapped afresh and each of its pages faulted in (16,384 faults of
    4 KiB pages; fewer with huge pages); once ``keep_freed_blocks`` has run, the freed block is reused."""
    def last_faults(mode: str) -> tuple[str, int]:
        out = subprocess.run([sys.executable, "-c", BLOCK_FAULTS, mode], capture_output=True, text=True, check=True,
                             timeout=120).stdout.split()
        return out[0], int(out[1])
    assert last_faults("keep")[0] == "True"
    default, kept = last_faults("default")[1], last_faults("keep")[1]
    assert default > 0 and kept <= default // 4, (default, kept)


def test_moe_bench_rows_compare_the_four_layers_and_the_gate_at_each_stage_width():
    """Tiny token counts: a row per candidate and stage width, each timed; the MoE layers have the dense MLP's
    FLOPs (dropless's counted through its grouped experts, the capacity layers' padded slots included), only
    the capacity layers drop routes, and the gate alone costs a fraction of its layer's FLOPs."""
    from mthl_ds.studies.bench.moe import WIDTHS, run
    rows = run(repeats=1, scale=1 / 1024, datasets=("ade20k",))
    assert [(r["width"], r["candidate"]) for r in rows] == [(w, c) for w in WIDTHS
                                                            for c in ("capacity", "dropless", "deepspeed", "dense",
                                                                      "gate")]
    for r in rows:
        assert r["ms"] > 0 and r["ratio"] > 0, r
        if r["candidate"] == "dropless":
            assert 0.95 < r["flops_ratio"] < 1.1 and r["dropped"] == "0.0%" and r["note"] == "experts: looped", r
        if r["candidate"] == "capacity":
            assert r["note"] == "experts: looped", r  # one CPU rank
        if r["candidate"] == "dense":
            assert r["ratio"] == 1.0 and r["flops_ratio"] == 1.0
        if r["candidate"] == "gate":
            assert 0 < r["flops_ratio"] < 0.5 and r["dropped"] == "", r


def test_step_bench_refuses_a_batch_for_a_dataset_the_recipe_does_not_train(capsys):
    from mthl_ds.cli import main
    from mthl_ds.studies.bench.step import run
    with pytest.raises(ValueError, match=r"\['pets'\], which recipe 'demo' does not train; its datasets: \['ade20k'"):
        run("demo", ("fp32",), batches={"imagenet": 2, "pets": 4})
    with pytest.raises(SystemExit):
        main(["bench", "step", "--batches", "imagenet=0"])
    assert "'imagenet=0': use NAME=BATCH with a positive batch" in capsys.readouterr().err


@pytest.mark.parametrize("scale", ["0", "-1", "nan", "inf", "quarter"])
def test_moe_bench_refuses_a_scale_that_is_not_a_positive_number(scale, capsys):
    from mthl_ds.cli import main
    with pytest.raises(SystemExit):
        main(["bench", "moe", "--scale", scale])
    assert f"{scale!r}: use a positive number" in capsys.readouterr().err


def test_step_bench_times_both_dispatch_modes_against_the_dense_twin_per_dataset_and_precision(tmp_path, capsys):
    """``mthl-ds bench step`` on the demo recipe, one round: per dataset and precision a row for MTHL capacity
    (on the CPU its experts looped, and batched), MTHL dropless and MTHL.D, with the FLOPs ratio of twins (about
    1; above it for dropless in bf16, whose experts run their rows padded on the CPU, and more so for the demo's
    few rows each) and only the capacity models dropping routes. ``--batches`` sets a dataset's batch; the others
    keep the CPU's (8, 1, 2). ``--system-malloc``: this test process keeps the C library's defaults."""
    from mthl_ds.cli import main
    from mthl_ds.studies.bench.step import BATCHED, CANDIDATES
    candidates = (CANDIDATES[0], BATCHED, *CANDIDATES[1:])  # the CPU: the capacity experts looped, and batched
    assert main(["bench", "step", "--recipe", "demo", "--precisions", "fp32,bf16", "--repeats", "1",
                 "--batches", "imagenet=16", "--system-malloc", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench_step.json").read_text())
    assert len([line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]) == len(rows)
    assert [(r["precision"], r["dataset"], r["candidate"]) for r in rows] == [
        (p, d, c) for p in ("fp32", "bf16") for d in ("imagenet", "coco", "ade20k") for c in candidates]
    assert {r["dataset"]: r["batch"] for r in rows} == {"imagenet": 16, "coco": 1, "ade20k": 2}
    for r in rows:
        padded = r["candidate"] == "MTHL dropless" and r["precision"] == "bf16"
        assert r["ms"] > 0 and 0.99 < r["flops_ratio"] < (1.25 if padded else 1.05), r
        if r["candidate"] == "MTHL.D":
            assert r["ratio"] == 1.0 and r["met"] is None and r["dropped"] == ""
        else:
            assert r["ratio"] > 0 and isinstance(r["met"], bool) and r["dropped"].endswith("%"), r
    dropless = {(r["precision"], r["dataset"]): r["flops_ratio"] for r in rows if r["candidate"] == "MTHL dropless"}
    assert all(dropless["bf16", d] > dropless["fp32", d] for d in ("imagenet", "coco", "ade20k"))
    assert any(r["dropped"] != "0.0%" for r in rows if r["candidate"] in ("MTHL capacity", BATCHED))
    assert all(r["dropped"] == "0.0%" for r in rows if r["candidate"] == "MTHL dropless")


def test_a_released_bench_trainer_frees_its_engine(tmp_path):
    """DeepSpeed's gradient hooks keep an engine alive from the autograd graph, out of the cycle collector's sight;
    ``release`` frees it after a step, so benchmarks that build trainer after trainer hold one at a time."""
    import gc
    import weakref

    from mthl_ds.runtime.engine import init_distributed
    from mthl_ds.studies.bench.gpu import bench_recipe, bench_trainer, release, trainer_step
    init_distributed()
    trainer = bench_trainer(bench_recipe("demo", "bf16", tmp_path, {"imagenet": 2, "coco": 1, "ade20k": 2}), tmp_path)
    trainer_step(trainer, "imagenet", 1)()
    engine, model = weakref.ref(trainer.engine), weakref.ref(trainer.model)
    release(trainer)
    del trainer
    gc.collect()
    assert engine() is None and model() is None


def test_launch_count_counts_a_kernel_per_op_and_the_bytes_its_tensors_hold():
    """Views launch nothing and touch nothing; an op reads its tensor arguments, writes back the ones it mutates
    and writes its fresh results; a multi-tensor op counts once."""
    import torch
    from mthl_ds.studies.bench.launches import LaunchCount
    a, b, n = torch.ones(1000), torch.ones(1000), 4000  # bytes of one float32 vector
    counter = LaunchCount()
    with counter:
        c = a + b  # reads a, b; writes c
        a.add_(b)  # reads a, b; writes a
        a.view(10, 100).t()
        torch._foreach_mul_([a, b], 2.0)  # reads and writes both
        counter.mark("step")
        a.half().sum()  # reads a, writes 1000 halves; reads them, writes one float16
    assert counter.counts == {"forward": 3, "backward": 0, "step": 2, "after step": 0}
    assert counter.bytes == {"forward": 3 * n + 3 * n + 4 * n, "backward": 0, "step": n + n // 2 + n // 2 + 2,
                             "after step": 0}
    assert torch.equal(c, torch.full((1000,), 2.0))


def test_launch_bench_counts_each_phase_of_a_trainer_step_against_the_bare_loop(tmp_path):
    """``mthl-ds bench launches`` on mthl_swin_t (batch 1): the bare timm loop first, then MTHL.D, MTHL capacity
    (its experts looped, and batched, as a GPU runs them) and MTHL dropless through the trainer, each phase
    counted. The optimizer step (ZeRO 2's norm, LAMB) launches fewer kernels than the model has tensors: it is
    multi-tensor, where DeepSpeed's own norm takes two per tensor (a float64 copy and a norm)."""
    from mthl_ds.build import build_model
    from mthl_ds.cli import main
    from mthl_ds.config import load_recipe
    from mthl_ds.studies.bench.launches import PHASES
    from mthl_ds.studies.model_info import dense_twin
    assert main(["bench", "launches", "--batches", "imagenet=1,coco=1,ade20k=2", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench_launches.json").read_text())
    assert [(r["candidate"], r["dispatch"]) for r in rows] == [
        ("bare timm Swin-T loop", ""), ("MTHL.D through the trainer", "dense"),
        ("MTHL through the trainer", "capacity (experts: looped)"),
        ("MTHL through the trainer", "capacity (experts: batched)"),
        ("MTHL through the trainer", "dropless (experts: looped)")]
    recipe = load_recipe("mthl_swin_t")
    tensors = {"dense": len(list(build_model(dense_twin(recipe)).parameters())),
               "moe": len(list(build_model(recipe).parameters()))}
    for r in rows:
        assert r["total"] == sum(r[p] for p in PHASES) and r["forward"] > 0 and r["backward"] > 0, r
        assert r["ratio"] == round(r["total"] / rows[0]["total"], 2)
        assert r["GB touched"] > 0 and abs(r["GB ratio"] - r["GB touched"] / rows[0]["GB touched"]) < 0.02, r
        if r["dispatch"]:
            assert 0 < r["step"] < tensors["dense" if r["dispatch"] == "dense" else "moe"], (r, tensors)
    moe = [r for r in rows if r["dispatch"].startswith("capacity")]
    assert all(r["GB touched"] > rows[1]["GB touched"] for r in rows[2:])  # three times MTHL.D's MLP weights
    assert moe[1]["total"] < moe[0]["total"]  # batched experts: two bmm per linear layer, not one matmul per expert

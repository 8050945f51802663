"""Real DeepSpeed engines on 2 gloo ranks: expert parallelism and the all-reduced MI buffers."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, WORKERS, run_ranks
from workers.moe_ranks import EP_OVERRIDES, global_batch, per_expert

from mthl_ds.build import build_model
from mthl_ds.config import load_recipe
from mthl_ds.runtime.engine import free_port, launcher_free_env


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("moe_ranks")
    run_ranks("moe_ranks.py", 2, [str(out)])
    return [torch.load(out / f"rank{r}.pt") for r in (0, 1)]


def test_expert_parallel_equals_one_process(ranks):
    recipe = load_recipe("demo", [o for o in EP_OVERRIDES if not o.startswith("train.ep_size")])
    model = build_model(recipe)
    images, labels = global_batch()
    model.set_dataset("imagenet")
    logits = model(images)
    loss = F.cross_entropy(logits, labels)
    loss.backward()
    torch.testing.assert_close(torch.cat([ranks[0]["ep"]["logits"], ranks[1]["ep"]["logits"]]), logits.detach(),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close((ranks[0]["ep"]["loss"] + ranks[1]["ep"]["loss"]) / \
                               2, loss.detach(), rtol=1e-5, atol=1e-6)
    expected = per_expert((n, p.grad) for n, p in model.named_parameters() if p.grad is not None)
    got = {**ranks[1]["ep"]["grads"], **ranks[0]["ep"]["grads"]}
    assert set(expected) <= set(got)
    assert all(not got[n].any() for n in set(got) - set(expected)), "unused parameters must get zero gradient"
    experts = [n for n in expected if ".deepspeed_experts." in n]
    assert len(experts) > 0 and any(n in ranks[1]["ep"]["grads"] and n not in ranks[0]["ep"]["grads"] for n in experts)
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_mi_buffers_identical_on_both_ranks_and_survive_checkpoint(ranks):
    b0, b1 = ranks[0]["buffer"]["buffers"], ranks[1]["buffer"]["buffers"]
    assert len(b0) == 5 and set(b0) == set(b1)
    for name in b0:
        assert torch.equal(b0[name], b1[name]), name
        assert not torch.allclose(b0[name], torch.full_like(b0[name], b0[name].mean())), "buffer never updated"
        assert torch.equal(ranks[0]["buffer"]["loaded"][name], b0[name])
        assert torch.equal(ranks[1]["buffer"]["loaded"][name], b1[name])


def test_deepspeed_launcher_ranks_leave_no_shared_memory(tmp_path):
    """DeepSpeed's CPU backend maps a ~70 MB /dev/shm buffer per rank under its launcher (which sets LOCAL_SIZE)
    and never removes it; engine.init_distributed removes the names once every rank has mapped them."""
    port = free_port()
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(port),
           str(WORKERS / "init_ranks.py")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env=dict(launcher_free_env(), OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "rank 0/2 sum 2" in proc.stdout and "rank 1/2 sum 2" in proc.stdout
    left = sorted(p.name for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    assert not left, f"the ranks left DeepSpeed shared-memory buffers in /dev/shm: {left}"


def test_deepspeed_builds_its_ops_in_a_folder_per_torch_version(tmp_path):
    """A process of the package builds DeepSpeed's shared-memory all-reduce op under
    ``torch_extensions/torch<version>_py<python>``, not in torch's folder shared by every torch version of one
    Python and CUDA, whose ``lock`` torch 2.14 leaves behind and torch 2.11 waits on forever; a
    ``TORCH_EXTENSIONS_DIR`` of the user's is kept."""
    code = ("import os; from mthl_ds.runtime.engine import init_distributed; init_distributed(); "
            "print(os.environ['TORCH_EXTENSIONS_DIR'])")
    env = {k: v for k, v in launcher_free_env().items() if k != "TORCH_EXTENSIONS_DIR"}
    env.update(XDG_CACHE_HOME=str(tmp_path / "cache"), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    version = f"torch{torch.__version__}_py{sys.version_info[0]}{sys.version_info[1]}"
    folder = tmp_path / "cache" / "torch_extensions" / version
    assert proc.stdout.strip().splitlines()[-1] == str(folder)
    assert list((folder / "deepspeed_shm_comm").glob("*.so")), sorted(p.name for p in folder.rglob("*"))
    assert [p.name for p in (tmp_path / "cache" / "torch_extensions").iterdir()] == [folder.name]
    mine = tmp_path / "mine"
    proc = subprocess.run([sys.executable, "-c", "import os, mthl_ds.runtime.accelerator; "
                           "print(os.environ['TORCH_EXTENSIONS_DIR'])"], capture_output=True, text=True,
                          timeout=120, env=dict(env, TORCH_EXTENSIONS_DIR=str(mine)))
    assert proc.returncode == 0 and proc.stdout.strip() == str(mine), proc.stderr[-2000:]

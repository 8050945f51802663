"""fp16 as the V100 run uses it (DeepSpeed's fp16 ZeRO 2 optimizer, dynamic loss scaling, LAMB, ep_size 2) and bf16,
on 2 CPU ranks through mthl_ds.runtime.cpu_half; its fp32 numerics; and what a skipped step leaves alone."""
import json

import pytest
import torch
from conftest import ROOT, run_ranks

from mthl_ds.runtime import cpu_half


def write_fp16_config(folder):
    """The repo's fp16 config with the loss scale starting at 2^10: at 2^16 the demo's first steps overflow by
    themselves (as on a GPU), which would skip steps the tests do not choose."""
    config = json.loads((ROOT / "ds_configs" / "zero2_fp16.json").read_text())
    config["fp16"]["initial_scale_power"] = 10
    (folder / "fp16_2p10.json").write_text(json.dumps(config))


def test_fp16_overflow_on_one_rank_is_skipped_everywhere_and_resumes_bitwise(shards, tmp_path):
    write_fp16_config(tmp_path)
    run_ranks("half_ranks.py", 2, ["overflow", str(shards), str(tmp_path)])
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["skipped"] == [3, 4] and s["reasons"] == ["gradient overflow"] * 2
    # hysteresis 2: the first overflow spends the hysteresis, the second halves the scale (min 1, window 1000)
    assert s["scales"] == [1024.0] * 5 + [512.0] * 3
    for key, ranks in s["unchanged"].items():  # weights, fp32 master, LAMB moments, B(D, E), usage: all untouched
        assert ranks == [True, True], key
    for key, ranks in s["changed_when_applied"].items():  # ... which an applied step does move
        assert ranks == [True, True], key
    # the LR schedule stays on the trainer's step: the same values as a run without skips
    from conftest import demo_overrides

    from mthl_ds.config import load_recipe
    from mthl_ds.runtime.engine import triangular_schedule
    recipe = load_recipe("demo", demo_overrides(shards, steps=7))
    schedule = triangular_schedule(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=recipe.train.lr),
                                   recipe.train.warmup_steps, 7)
    expected = []
    for _ in range(7):
        expected.append(schedule.get_last_lr()[0])
        schedule.step()
    assert s["lrs"] == pytest.approx(expected, rel=1e-12)
    assert s["resumed_bitwise"] == [True, True] and s["resumed_losses_equal"]


def test_fp16_and_bf16_zero2_lamb_track_fp32_stage0(shards, tmp_path):
    write_fp16_config(tmp_path)
    run_ranks("half_ranks.py", 2, ["track", str(shards), str(tmp_path)])
    s = json.loads((tmp_path / "summary.json").read_text())
    base = s["losses"]["fp32"]
    assert len(base) == 5 and s["skipped"] == {"fp32": [], "fp16": [], "bf16": []}
    # stated tolerances: every loss within 1% of fp32 stage 0's for fp16 (10 mantissa bits), 3% for bf16 (7 bits);
    # the weights after 5 steps within 0.5% / 2% (norm of the difference over the norm of the weights)
    assert s["losses"]["fp16"] == pytest.approx(base, rel=1e-2)
    assert s["losses"]["bf16"] == pytest.approx(base, rel=3e-2)
    assert s["param_drift"]["fp16"] < 5e-3 and s["param_drift"]["bf16"] < 2e-2
    assert s["losses"]["fp16"] != base and s["param_drift"]["fp16"] > 0  # it did run in another precision


def test_router_and_mi_loss_stay_float32_in_fp16_and_tied_routes_agree_on_ranks(shards, tmp_path):
    run_ranks("half_ranks.py", 2, ["precision", str(shards), str(tmp_path)])
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["weights"] == "torch.float16" and s["router_in"] == "torch.float16"
    assert (s["logits"], s["mi"], s["joint"]) == ("torch.float32",) * 3
    routes = s["tied_routes"]
    assert routes[0] == routes[1] == [[1, 1, 1], [2, 2, 2]]
    assert s["tied_gates"][0] == s["tied_gates"][1] and s["capacity"][0] == s["capacity"][1]


def test_cpu_half_computes_fp16_matmuls_in_float32():
    """A matmul and a convolution of fp16 values, forward and backward, equal float32 on the same values rounded
    to fp16 (what tensor cores return), and the result stays fp16."""
    cpu_half.enable()
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 300, generator=g).half(), torch.randn(300, 32, generator=g).half()
    assert torch.equal(a @ b, (a.float() @ b.float()).half())
    x = torch.randn(1, 8, 16, 16, generator=g).half().requires_grad_()
    w = torch.randn(4, 8, 3, 3, generator=g).half().requires_grad_()
    y = torch.nn.functional.conv2d(x, w, padding=1)
    y.sum().backward()
    x32, w32 = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    torch.nn.functional.conv2d(x32, w32, padding=1).sum().backward()
    assert y.dtype == x.grad.dtype == w.grad.dtype == torch.float16
    assert torch.equal(y, torch.nn.functional.conv2d(x32, w32, padding=1).half())
    assert torch.equal(w.grad, w32.grad.half())

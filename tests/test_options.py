"""Recipe keys and verbs no other test exercised, each checked by what it changes (each test fails if its option
is ignored): adapters, mid-run evaluation, the AES held-out batch cap, threshold pruning, the rest of
the adapt section, the gate's capacities and router options, the auxiliary segmentation head, and the verbs
`mthl-ds stability` and `mthl-ds adapt-report`.

Two runs are shared: one in-process single-rank demo run (`trained`: 6 steps with a mid-run evaluation every 2,
AES checks capped at one held-out batch, no auxiliary head) and one `adapt-report` of the adapter mode on pets
(`report`)."""
import json
import math
import random
import shutil
from collections import Counter

import pytest
import torch
import yaml
from conftest import demo_overrides

from mthl_ds.adapt import NewDataset, phase_recipe
from mthl_ds.adapt_modes import MODES
from mthl_ds.artifacts import surgery
from mthl_ds.artifacts.adapted import adapted_model
from mthl_ds.artifacts.checkpoint import consolidate
from mthl_ds.artifacts.export import load_export, read_metadata, save_export
from mthl_ds.build import build_model
from mthl_ds.cli import main
from mthl_ds.config import load_recipe
from mthl_ds.data.reader import ShardSet
from mthl_ds.moe.layer import Adapter


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """An untrained demo model, exported: what the adaptation tests start from."""
    return save_export(tmp_path_factory.mktemp("source") / "demo.safetensors", build_model(load_recipe("demo")),
                       {"note": "fresh demo model"})


@torch.no_grad()
def outputs(model, names=("imagenet", "ade20k"), size=64):
    """Each dataset's output on fixed inputs, flattened to one tensor (eval mode)."""
    gen = torch.Generator().manual_seed(3)
    model.eval()
    result = {}
    for name in names:
        model.set_dataset(name)
        out = model(torch.randn(2, 3, size, size, generator=gen))
        result[name] = out if isinstance(out, torch.Tensor) else torch.cat(
            [t.flatten() for t in out.values() if isinstance(t, torch.Tensor)])
    return result


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def adapt_recipe(tmp_path, source, shards, adapt, overrides=()):
    """An adapt recipe for pets from ``source`` (as `mthl-ds adapt` writes it), loaded from its YAML file with
    ``overrides``."""
    data = NewDataset("pets", shards / "pets", (64, 64), batch_size=4, head_channels=32)
    path = tmp_path / f"recipe_{len(list(tmp_path.glob('recipe_*')))}.yaml"
    path.write_text(yaml.safe_dump(phase_recipe(source, data, adapt, None, {"steps": 1, "workers": 0})))
    return load_recipe(str(path), overrides)


# ------------------------------------------------------------------------------------- adapters (Houlsby)

def test_adapters_add_zero_initialised_bottlenecks_that_change_outputs_once_trained():
    """``add_adapters``: a bottleneck ``dim -> dim // r -> dim`` after every MoE MLP, added to its output. ``up``
    starts at zero (``Adapter``'s design), so the model computes exactly what it did; ``down`` starts random, so the
    first gradient reaches ``up``; once ``up`` is non-zero the outputs change."""
    model = build_model(load_recipe("demo"))
    before, params = outputs(model), count_parameters(model)
    surgery.apply(model, [{"op": "add_adapters", "reduction": 4}])
    layers = model.backbone.moe_layers
    assert len(layers) == 5 and all(isinstance(layer.adapter, Adapter) for layer in layers)
    widths = [(layer.dim, layer.adapter.down.out_features) for layer in layers]
    assert widths == [(32, 8), (64, 16), (128, 32), (128, 32), (256, 64)]
    assert count_parameters(model) - params == sum(2 * d * b + b + d for d, b in widths)
    for layer in layers:
        assert not layer.adapter.up.weight.any() and not layer.adapter.up.bias.any()
        assert layer.adapter.down.weight.std() > 0
    after = outputs(model)
    assert all(torch.equal(after[n], before[n]) for n in before)  # bit-identical: the adapter adds exact zeros
    model.train()
    model.set_dataset("imagenet")
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    assert all(layer.adapter.up.weight.grad.abs().sum() > 0 for layer in layers)
    with torch.no_grad():
        for layer in layers:
            layer.adapter.up.weight.normal_(std=0.02, generator=torch.Generator().manual_seed(1))
    changed = outputs(model)
    assert all(not torch.allclose(changed[n], before[n]) for n in before)
    assert model.surgery == [{"op": "add_adapters", "reduction": 4}]


def test_adapter_reduction_trains_only_adapters_routers_and_heads(shards, source, tmp_path):
    """``adapt.adapter_reduction``: the adapter baseline. With the backbone frozen, the trainable parameters are
    exactly the adapters (width dim // r) and the new dataset's routers and head; without it, no adapter."""
    plain = adapted_model(adapt_recipe(tmp_path, source, shards, {}))
    with_adapters = adapted_model(load_recipe("demo", [f"adapt.source={source}", "adapt.adapter_reduction=8",
                                                       "adapt.freeze_backbone=true"]))
    assert all(layer.adapter is None for layer in plain.backbone.moe_layers)
    assert not [n for n in trainable(plain) if ".adapter." in n]
    layers = with_adapters.backbone.moe_layers
    assert [layer.adapter.down.out_features for layer in layers] == [layer.dim // 8 for layer in layers]
    names = trainable(with_adapters)
    adapters = {n for n in names if ".adapter." in n}
    routers = {n for n in names if ".gate.routers." in n}
    heads = {n for n in names if n.startswith("heads.")}
    assert len(adapters) == 4 * len(layers) and names == adapters | routers | heads
    assert {n.split(".routers.")[1].split(".")[0] for n in routers} == {"imagenet", "coco", "ade20k"}
    assert not [n for n in names if "deepspeed_moe.experts" in n or "patch_embed" in n]
    pets = adapt_recipe(tmp_path, source, shards, {"adapter_reduction": 4})
    model = adapted_model(pets)
    assert {n.split(".")[1] for n in trainable(model) if n.startswith("heads.")} == {"pets"}
    assert len([n for n in trainable(model) if ".adapter." in n]) == 4 * len(layers)


# ----------------------------------------------------------------------- `mthl-ds adapt-report`, adapter mode

REPORT_ARGS = ["--modes", "adapter", "--steps", "3", "--lr", "0.01", "--batch-size", "4", "--size", "96", "96",
               "--head-channels", "32", "--workers", "0", "--seed", "5"]


@pytest.fixture(scope="module")
def report(shards, source, tmp_path_factory):
    """`mthl-ds adapt-report` with one mode (adapter) and one dataset (pets), at 96 x 96 (the export's
    classification size is 64)."""
    out = tmp_path_factory.mktemp("report")
    assert main(["adapt-report", str(source), "--data", f"pets={shards / 'pets'}", "--out", str(out),
                 *REPORT_ARGS]) == 0
    return out


def test_adapt_report_runs_the_named_mode_on_the_named_data_with_the_given_settings(report, source):
    rows = json.loads((report / "table3.json").read_text())
    assert [(r["mode"], r["dataset"], r["phases"]) for r in rows] == [("adapter", "pets", 1)]
    row = rows[0]
    assert row["metric"] == "top1" and 0 <= row["value"] <= 100 and row["chance"] == 20.0
    table = (report / "table3.md").read_text().splitlines()
    assert table[0].startswith("| mode | pets train. par. (M) |") and table[2].startswith("| adapter | ")
    assert (report / "tradeoff.png").stat().st_size > 0
    phase = report / "pets" / "adapter" / "phase1"
    recipe = yaml.safe_load((phase / "recipe.yaml").read_text())
    assert recipe["adapt"]["adapter_reduction"] == 4 and recipe["adapt"]["source"] == str(source.resolve())
    assert {k: recipe["train"][k] for k in ("steps", "lr", "workers", "seed", "warmup_steps")} == {
        "steps": 3, "lr": 0.01, "workers": 0, "seed": 5, "warmup_steps": 1}
    pets = recipe["datasets"]["pets"]
    assert (pets["batch_size"], pets["size"], pets["head_channels"]) == (4, [96, 96], 32)
    steps = [json.loads(line) for line in (phase / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if "loss" in r] == [0, 1, 2]
    # the table's figures are those of the trained model: FLOPs at 96 x 96, the adapters among the trainable
    model, _ = load_export(phase / "model.safetensors")
    assert row["model_params"] == count_parameters(model)
    layers = model.backbone.moe_layers
    routers_and_head = sum(p.numel() for n, p in model.named_parameters() if n.startswith("heads.pets.")
                           or ".routers.pets." in n)
    adapters = sum(p.numel() for layer in layers for p in layer.adapter.parameters())
    assert row["trainable_params"] == routers_and_head + adapters
    assert row["flops"] == backbone_flops(model, 96) > backbone_flops(model, 64)


def backbone_flops(model, size):
    from torch.utils.flop_counter import FlopCounterMode
    model.eval()
    model.set_dataset("pets")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.backbone(torch.zeros(1, 3, size, size))
    return counter.get_total_flops()


def test_adapt_report_reuses_results_and_force_retrains_from_scratch(report, shards, source, tmp_path):
    """Without --force a mode with a result is not run again; with --force it is trained again from its first
    step with the new settings (here another seed), not resumed from the earlier run's checkpoint."""
    out = tmp_path / "report"
    shutil.copytree(report, out)
    phase = out / "pets" / "adapter" / "phase1"
    first = (phase / "run" / "metrics.jsonl").read_text()
    base = ["adapt-report", str(source), "--data", f"pets={shards / 'pets'}", "--out", str(out)]
    assert main([*base, *REPORT_ARGS[:-1], "6"]) == 0
    assert (phase / "run" / "metrics.jsonl").read_text() == first
    assert yaml.safe_load((phase / "recipe.yaml").read_text())["train"]["seed"] == 5
    assert main([*base, *REPORT_ARGS[:-1], "6", "--force"]) == 0
    assert yaml.safe_load((phase / "recipe.yaml").read_text())["train"]["seed"] == 6
    rows = [json.loads(line) for line in (phase / "run" / "metrics.jsonl").read_text().splitlines()]
    launches = json.loads((phase / "run" / "launch" / "rank0.json").read_text())
    assert launches["start_step"] == 0 and launches["moe_dispatch"] == "capacity (experts: looped)"
    assert [r["step"] for r in rows if "loss" in r] == [0, 1, 2]
    old = [json.loads(line) for line in first.splitlines()]
    assert [r["loss"] for r in rows if "loss" in r] != [r["loss"] for r in old if "loss" in r]  # seed 6's draws


def test_adapter_export_loads_back_with_the_runs_outputs_and_a_frozen_backbone(report, source, shards):
    """The adapter mode's export: its metadata names the adapters, it loads back (surgery replayed) with outputs
    equal to the run's own checkpoint and the metric the trainer measured, the adapters trained and everything
    but them, the routers and the head is the source's, bit for bit."""
    from mthl_ds.evaluate import run_evaluate
    phase = report / "pets" / "adapter" / "phase1"
    model, meta = load_export(phase / "model.safetensors")
    assert meta["model"]["adapters"] is True and meta["model"]["heads"] == ["pets"]
    assert {"op": "add_adapters", "reduction": 4} in meta["surgery"]
    checkpoint_model, _ = consolidate(phase / "run")
    a, b = outputs(model, ["pets"], 96), outputs(checkpoint_model, ["pets"], 96)
    assert torch.equal(a["pets"], b["pets"])
    trained_value = json.loads((phase / "run" / "final_metrics.json").read_text())["pets"]["value"]
    summary = run_evaluate(phase / "model.safetensors", [("pets", shards / "pets")], device="cpu")
    assert summary["results"]["pets"]["value"] == pytest.approx(trained_value, abs=1e-9)
    assert all(layer.adapter.up.weight.abs().sum() > 0 for layer in model.backbone.moe_layers)  # they learned
    start = load_export(source)[0].state_dict()
    after = model.state_dict()
    moved = {k for k in after if k in start and not torch.equal(after[k], start[k])}
    assert moved and all(".routing_joint" in k for k in moved), sorted(moved)[:5]  # B(D, E) rows only


# ----------------------------------------------------------------------------- one trained run, many options

@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory):
    """6 demo steps on one rank in this process: an evaluation every 2 steps, a checkpoint every 2, AES checks
    every 3 steps on a 20% held-out split read one batch at a time, and ADE20K without its auxiliary head."""
    from mthl_ds.train import Trainer
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    overrides = demo_overrides(shards, steps=6, ep_size=1, ckpt_every=2, keep_checkpoints=3, eval_every=2,
                               **{"aes.every": 3, "aes.holdout": 0.2, "aes.max_batches": 1})
    trainer = Trainer(load_recipe("demo", overrides + ["datasets.ade20k.aux_weight=0"]), run_dir)
    trainer.run()
    return trainer


def metrics_rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_eval_every_evaluates_mid_run_at_those_steps_on_those_weights(trained, shards, tmp_path):
    """``train.eval_every=2`` on 6 steps: evaluations after steps 2 and 4 besides the final one, each of the weights
    of that step: the step-2 checkpoint (`mthl-ds export --tag`), scored by `mthl-ds evaluate`, gives the step-2
    row's figures."""
    rows = metrics_rows(trained.run_dir)
    evals = {r["step"]: r["eval"] for r in rows if "eval" in r}
    assert list(evals) == [2, 4, 6]
    assert all(set(e) == {"imagenet", "coco", "ade20k"} for e in evals.values())
    export = tmp_path / "step2.safetensors"
    assert main(["export", str(trained.run_dir), "--tag", "step00000002", "--out", str(export)]) == 0
    assert read_metadata(export)["source"]["step"] == 2
    data = ["--data", f"imagenet={shards / 'imagenet'}", "--data", f"ade20k={shards / 'ade20k'}"]
    assert main(["evaluate", str(export), *data, "--batch-size", "3", "--out", str(tmp_path / "ev")]) == 0
    results = json.loads((tmp_path / "ev" / "eval_metrics.json").read_text())["results"]
    for name in ("imagenet", "ade20k"):
        for key, value in evals[2][name]["all"].items():
            assert results[name]["all"][key] == pytest.approx(value, abs=1e-6), (name, key)
    # --split: the same export on the train split reads the train shards
    assert main(["evaluate", str(export), "--data", f"imagenet={shards / 'imagenet'}", "--split", "train",
                 "--out", str(tmp_path / "train")]) == 0
    on_train = json.loads((tmp_path / "train" / "eval_metrics.json").read_text())
    assert on_train["split"] == "train"
    assert on_train["results"]["imagenet"]["all"]["samples"] == len(ShardSet.open(shards / "imagenet" / "train"))


def test_aes_max_batches_caps_the_heldout_batches_of_each_check(trained):
    """``train.aes.max_batches=1``: each AES check runs one held-out batch per dataset (the logged loss is that
    batch's); with 0 it runs all of them (here 5, 3 and 2)."""
    rows = metrics_rows(trained.run_dir)
    checks = {r["step"]: r["aes"]["heldout_loss"] for r in rows if "aes" in r}
    assert list(checks) == [3, 6]
    aes, names = trained.recipe.train.aes, list(trained.recipe.datasets)
    assert aes.max_batches == 1
    seen = []
    hook = trained.model.register_forward_pre_hook(lambda m, args: seen.append(m.dataset))
    try:
        capped = trained.heldout_losses(names)
        capped_batches = Counter(seen)
        seen.clear()
        aes.max_batches = 0
        full = trained.heldout_losses(names)
        full_batches = Counter(seen)
    finally:
        aes.max_batches = 1
        hook.remove()
    expected = {}
    for name in names:
        held = sum(len(v) for v in trained.heldout[name].values())
        d = trained.recipe.datasets[name]
        expected[name] = math.ceil(held / (d.eval_batch_size or d.batch_size))
    assert expected == {"imagenet": 5, "coco": 3, "ade20k": 2}
    assert dict(full_batches) == expected and dict(capped_batches) == dict.fromkeys(names, 1)
    # the step-6 check ran on the final weights: its logged losses are those of one batch, not of all
    assert capped == pytest.approx(checks[6], rel=1e-6)
    assert full["imagenet"] != pytest.approx(checks[6]["imagenet"], rel=1e-6)


def test_aux_weight_zero_builds_no_auxiliary_head_and_no_aux_loss(trained):
    """``datasets.*.aux_weight``: 0 gives UperNet no FCN auxiliary head (the trained run logs only the main cross
    entropy); another value weighs the auxiliary cross entropy by it."""
    head = trained.model.heads["ade20k"]
    assert head.aux is None and not [n for n in head.state_dict() if n.startswith("aux.")]
    seg_rows = [r for r in metrics_rows(trained.run_dir) if r.get("dataset") == "ade20k" and "loss" in r]
    assert seg_rows and all("ce" in r and "aux_ce" not in r and r["loss"] == r["ce"] for r in seg_rows)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 64, 64, generator=gen)
    batch = {"mask": torch.randint(0, 4, (2, 64, 64), generator=gen)}
    for weight in (0, 0.25):
        model = build_model(load_recipe("demo", [f"datasets.ade20k.aux_weight={weight}"])).train()
        model.set_dataset("ade20k")
        out = model(x)
        loss, parts = model.heads["ade20k"].loss(out, batch)
        if weight == 0:
            assert set(out) == {"logits"} and set(parts) == {"ce"} and torch.equal(loss.detach(), parts["ce"])
        else:
            assert set(out) == {"logits", "aux"} and set(parts) == {"ce", "aux_ce"}
            torch.testing.assert_close(loss.detach(), parts["ce"] + weight * parts["aux_ce"])


# -------------------------------------------------------------------------------------- pruning and adapt keys

def usage_file(tmp_path, name, layers):
    """A routing-statistics file (as `mthl-ds stats` writes it) with the given per-layer expert counts."""
    path = tmp_path / "routing_stats.json"
    path.write_text(json.dumps({"layers": [{"name": f"moe {i}", "experts": len(c), "usage": {name: c}}
                                           for i, c in enumerate(layers)]}))
    return path


# 1000 routes per layer: shares 0.2, 0.049, 0.05, 0, 0.151, 0.1, 0.049, 0.001, 0.15, 0.1, 0.1, 0.05
COUNTS = [200, 49, 50, 0, 151, 100, 49, 1, 150, 100, 100, 50]


def test_prune_threshold_keeps_exactly_the_experts_with_at_least_that_share(source, tmp_path):
    """``adapt.prune_threshold=0.05``: each MoE layer keeps the experts given at least 5% of its routes (a share of
    exactly 0.05 stays, 0.049 goes), in order, with their own weights; routers are re-indexed to them."""
    layers = [COUNTS[i:] + COUNTS[:i] for i in range(5)]  # another expert set per layer
    usage = usage_file(tmp_path, "imagenet", layers)
    recipe = load_recipe("demo", [f"adapt.source={source}", "adapt.prune_threshold=0.05", f"adapt.usage={usage}",
                                  "adapt.freeze_backbone=false"])
    model = adapted_model(recipe)
    original = load_export(source)[0]
    kept = [[e for e in range(12) if c[e] / 1000 >= 0.05] for c in layers]
    assert [len(k) for k in kept] == [8] * 5 and kept[0] == [0, 2, 4, 5, 8, 9, 10, 11]
    assert model.surgery[-1] == {"op": "keep_experts", "kept": kept}
    for layer, old, experts in zip(model.backbone.moe_layers, original.backbone.moe_layers, kept):
        assert layer.num_experts == len(experts) == layer.mlps.num_local_experts
        for now, before in zip(layer.mlps.stacks(), old.mlps.stacks()):
            assert torch.equal(now, before[experts])
        choices = layer.gate.routers["imagenet"].choices.tolist()
        assert [e for e, c in enumerate(choices) if c >= 0] == experts and sorted(c for c in choices if c >= 0) == \
            list(range(len(experts)))
    unpruned = adapted_model(load_recipe("demo", [f"adapt.source={source}", f"adapt.usage={usage}"]))
    assert [layer.num_experts for layer in unpruned.backbone.moe_layers] == [12] * 5
    higher = adapted_model(load_recipe("demo", [f"adapt.source={source}", "adapt.prune_threshold=0.1",
                                                f"adapt.usage={usage}"]))
    assert [layer.num_experts for layer in higher.backbone.moe_layers] == [6] * 5  # 0.2, 0.151, 0.15, 3 x 0.1
    assert MODES["prune_theta5"][0][1]["prune_threshold"] == 0.05


@pytest.mark.parametrize("selection", ["most_used", "least_used", "random"])
def test_tune_experts_selection_picks_the_experts_it_names(source, tmp_path, selection):
    """``adapt.tune_experts=2`` with ``adapt.selection``: the two most or least used experts of each layer (from
    ``adapt.usage``), or two drawn by the seed, train with the routers and heads; no other expert does."""
    counts = [[(7 * e + 3 * i) % 12 * 10 + e for e in range(12)] for i in range(5)]  # distinct counts per layer
    usage = usage_file(tmp_path, "imagenet", counts)
    recipe = load_recipe("demo", [f"adapt.source={source}", "adapt.tune_experts=2", f"adapt.selection={selection}",
                                  f"adapt.usage={usage}"])
    model = adapted_model(recipe)
    names = trainable(model)
    for index, layer in enumerate(model.backbone.moe_layers):
        tuned = [e for e, trains in enumerate(layer.mlps.trainable()) if trains]
        ranked = sorted(range(12), key=lambda e: counts[index][e], reverse=True)
        if selection == "most_used":
            assert tuned == sorted(ranked[:2])
        elif selection == "least_used":
            assert tuned == sorted(ranked[-2:])
        else:
            assert tuned == sorted(random.Random(index).sample(range(12), 2))  # seed 0 * 1009 + layer
    assert len([n for n in names if "deepspeed_moe.experts" in n]) == 5 * 4  # one bank of two per layer


def test_keep_datasets_keeps_the_exports_heads_and_routers_frozen(shards, source, tmp_path):
    """``adapt.keep_datasets``: continual learning keeps the export's datasets (heads, routers, frozen) next to the
    new one; by default they are dropped."""
    dropped = adapted_model(adapt_recipe(tmp_path, source, shards, {}))
    kept = adapted_model(adapt_recipe(tmp_path, source, shards, {}, ["adapt.keep_datasets=true"]))
    assert sorted(dropped.heads) == ["pets"] and sorted(kept.heads) == ["ade20k", "coco", "imagenet", "pets"]
    assert sorted(dropped.backbone.moe_layers[0].gate.routers) == ["pets"]
    assert sorted(kept.backbone.moe_layers[0].gate.routers) == ["ade20k", "coco", "imagenet", "pets"]
    assert {n.split(".")[1] for n in trainable(kept) if n.startswith("heads.")} == {"pets"}
    assert not [n for n in trainable(kept) if ".routers." in n and ".routers.pets." not in n]
    inputs = outputs(kept, ["imagenet"])  # a kept dataset still computes what the export did
    assert torch.equal(inputs["imagenet"], outputs(load_export(source)[0], ["imagenet"])["imagenet"])


def test_add_experts_adds_trainable_experts_the_old_routers_cannot_select(source):
    """``adapt.add_experts=2``: 14 experts per layer, the two new ones (and nothing else of the backbone) trained;
    the export's routers have no logit for them."""
    model = adapted_model(load_recipe("demo", [f"adapt.source={source}", "adapt.add_experts=2"]))
    names = trainable(model)
    assert [layer.num_experts for layer in model.backbone.moe_layers] == [14] * 5
    assert len([n for n in names if "deepspeed_moe.experts" in n]) == 5 * 4  # a bank per layer: the new experts
    for layer in model.backbone.moe_layers:
        assert [e for e, trains in enumerate(layer.mlps.trainable()) if trains] == [12, 13]
        assert all(router.proj.out_features == 12 for router in layer.gate.routers.values())


# -------------------------------------------------------------------------------------------- gate and routers

def gate_call(gate, tokens, dataset="imagenet"):
    gate.context.dataset = dataset
    return gate(tokens, None, True, False)


def test_eval_capacity_factor_sizes_eval_capacity_and_capacity_factor_training(tmp_path):
    """``model.moe.capacity_factor`` sizes each expert's buffer in training, ``eval_capacity_factor`` in eval
    (with ``eval_drop_tokens``), both at least ``min_capacity``: DeepSpeed's ``ceil(factor * K * S / E)``."""
    recipe = load_recipe("demo", ["model.moe.capacity_factor=2.0", "model.moe.eval_capacity_factor=0.5",
                                  "model.moe.eval_drop_tokens=true", "model.moe.min_capacity=1"])
    model = build_model(recipe)
    gen = torch.Generator().manual_seed(0)
    for layer in model.backbone.moe_layers:
        tokens = torch.randn(96, layer.dim, generator=gen)
        gate = layer.gate
        gate.train()
        train = gate_call(gate, tokens)
        gate.eval()
        evaluation = gate_call(gate, tokens)
        assert (train[1], evaluation[1]) == (64, 16)  # 96 tokens, K = 4 of 12 experts: x 2.0 and x 0.5
        assert (evaluation[3] < 0).any() and not (train[3] < 0).any()  # eval drops routes over its capacity
    floor = build_model(load_recipe("demo", ["model.moe.eval_capacity_factor=0.5", "model.moe.eval_drop_tokens=true",
                                             "model.moe.min_capacity=20"]))
    gate = floor.backbone.moe_layers[0].gate.eval()
    assert gate_call(gate, torch.randn(96, 32, generator=gen))[1] == 20
    # without drops, training and eval size capacity to the busiest expert (a tensor, read by the layer)
    keep_all = build_model(load_recipe("demo", ["model.moe.drop_tokens=false", "model.moe.capacity_factor=0.1"]))
    gate = keep_all.backbone.moe_layers[0].gate
    for mode in (gate.train, gate.eval):
        mode()
        out = gate_call(gate, torch.randn(96, 32, generator=gen))
        assert int(out[1]) == int(out[6].max()) > 4 and (out[3] >= 0).all()


def test_renormalize_router_hidden_and_mi_momentum_reach_every_gate():
    """``model.moe.renormalize``: a token's K gate values sum to 1 (not by default); ``router_hidden``: every router
    is an MLP with that hidden width; ``mi_momentum``: B(D, E) moves by (1 - momentum) of the measured usage."""
    gen = torch.Generator().manual_seed(0)
    sums = {}
    for renormalize in (False, True):
        model = build_model(load_recipe("demo", [f"model.moe.renormalize={str(renormalize).lower()}"])).eval()
        gate = model.backbone.moe_layers[1].gate
        out = gate_call(gate, torch.randn(50, gate.dim, generator=gen))
        sums[renormalize] = out[5].sum(0)
    torch.testing.assert_close(sums[True], torch.ones(50))
    assert (sums[False] < 0.99).all()
    model = build_model(load_recipe("demo", ["model.moe.router_hidden=8"]))
    for layer in model.backbone.moe_layers:
        for router in layer.gate.routers.values():
            assert router.hidden.in_features == layer.dim and router.hidden.out_features == 8
            assert router.proj.in_features == 8
    assert all(r.hidden is None for r in build_model(load_recipe("demo")).backbone.moe_layers[0].gate.routers.values())
    model = build_model(load_recipe("demo", ["model.moe.mi_momentum=0.5"])).train()
    model.set_dataset("coco")
    model(torch.randn(2, 3, 128, 128, generator=gen))
    gates = model.backbone.moe_layers
    before = [layer.gate.routing_joint.clone() for layer in gates]
    pending = [layer.gate.pending_usage for layer in gates]
    model.backbone.update_routing_buffers()
    for layer, old, (row, usage) in zip(gates, before, pending):
        assert layer.gate.mi_momentum == 0.5
        expected = old.clone()
        expected[row] = old[row] * 0.5 + usage / 3 * 0.5
        torch.testing.assert_close(layer.gate.routing_joint, expected)


def test_moe_attention_experts_top_k_head_dim_and_losses():
    """``model.moe.attention.num_experts`` and ``top_k``: the attention experts and how many each token takes;
    ``model.moe.attention.head_dim``: each attention expert's width (default: block width / its top_k);
    ``model.moe.attention.losses``: the attention gates' router losses, apart from the MLP gates'."""
    default = build_model(load_recipe("demo_modsquad"))
    assert [(a.num_experts, a.head_dim) for a in default.backbone.attention_layers] == [(15, 64 // 6)] * 4
    smaller = build_model(load_recipe("demo_modsquad", ["model.moe.attention.num_experts=6",
                                                        "model.moe.attention.top_k=2"]))
    for layer in smaller.backbone.attention_layers:  # 6 experts of width 64 / 2, two per token
        assert (layer.num_experts, layer.head_dim, layer.query.out_features) == (6, 32, 6 * 32)
        assert layer.gate.num_experts == 6 and set(layer.gate.top_k.values()) == {2}
        assert gate_call(layer.gate, torch.randn(5, 64))[3].shape == (2, 5)
    model = build_model(load_recipe("demo_modsquad", ["model.moe.attention.head_dim=8",
                                                      "model.moe.attention.losses={zloss: 0.01}"]))
    for layer in model.backbone.attention_layers:
        assert layer.head_dim == 8 and layer.query.out_features == 15 * 8 and layer.key_value.out_features == 16
        assert layer.gate.loss_coefs == {"zloss": 0.01}
    assert all(layer.gate.loss_coefs == {"mi": 0.01} for layer in model.backbone.moe_layers)
    model.train()
    model.set_dataset("imagenet")
    model(torch.randn(2, 3, 64, 64))
    terms = model.backbone.router_loss_terms()
    assert "attention/zloss" in terms and "attention/mi" not in terms and "mi" in terms


# --------------------------------------------------------------------------------------- `mthl-ds stability`

def test_stability_summarises_each_seeds_metric_and_loss_excursion(tmp_path):
    """The summary over seeds: mean and sample std of each final metric, each seed's worst 20-step moving-average
    loss over its running minimum after warm-up, and the targets (excursion <= 3, COCO mAP std <= 3)."""
    from mthl_ds.studies.stability import format_summary, loss_excursion, summarise
    rows = [{"step": i, "dataset": "coco", "loss": 1.0} for i in range(40)]
    rows += [{"step": 40 + i, "dataset": "coco", "loss": 4.0} for i in range(20)]
    rows.insert(5, {"step": 99, "dataset": "imagenet", "loss": 100.0})  # another dataset's step
    rows.insert(6, {"step": 98, "dataset": "coco", "loss": 100.0, "skipped": True})  # a skipped step
    assert loss_excursion(rows, "coco", warmup_steps=0) == pytest.approx(4.0)
    assert loss_excursion(rows[:30], "coco", warmup_steps=0) == 1.0
    assert loss_excursion(rows, "coco", warmup_steps=100) == 1.0  # every window ends in warm-up
    runs = {}
    for seed, value in ((0, 60.0), (1, 70.0)):
        run = tmp_path / f"seed{seed}"
        run.mkdir()
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (rows if seed else rows[:30])))
        (run / "final_metrics.json").write_text(json.dumps({"coco": {"task": "detection", "metric": "mAP",
                                                                      "value": value, "chance": 0.0}}))
        runs[seed] = run
    summary = summarise(runs, warmup_steps=0)
    coco = summary["datasets"]["coco"]
    assert coco["values"] == [60.0, 70.0] and coco["mean"] == 65.0
    assert coco["std"] == pytest.approx(50 ** 0.5) and coco["excursions"] == [1.0, pytest.approx(4.0)]
    assert summary["targets_met"] is False and "NOT met" in format_summary(summary)


def test_stability_verb_on_a_tiny_recipe(shards, tmp_path):
    """`mthl-ds stability --seeds 3 --recipe FILE --set ...`: one 4-step demo on 2 ranks under the deepspeed
    launcher with a recipe file that drops COCO. The demo's data step is skipped: each seed folder's shards are
    marked complete (the demo reuses them) and ``train.data_root`` points at the test shards."""
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text("description: the demo without coco\nbase: demo\ndatasets: {coco: null}\n")
    out = tmp_path / "stability"
    (out / "seed3" / "shards").mkdir(parents=True)
    (out / "seed3" / "shards" / ".complete").write_text("ok\n")
    sets = [a for o in demo_overrides(shards, steps=4, warmup_steps=1) if ".coco." not in o for a in ("--set", o)]
    assert main(["stability", "--seeds", "3", "--recipe", str(recipe), "--out", str(out), *sets]) == 0
    summary = json.loads((out / "stability.json").read_text())
    final = json.loads((out / "seed3" / "final_metrics.json").read_text())
    assert summary["seeds"] == [3] and set(summary["datasets"]) == set(final) == {"imagenet", "ade20k"}
    for name, d in summary["datasets"].items():
        assert d["values"] == [final[name]["value"]] and d["mean"] == final[name]["value"] and d["std"] == 0.0
        assert d["excursions"] == [1.0]  # fewer than 20 steps of a dataset: no moving average
    run = out / "seed3" / "run"
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["train"]["seed"] == 3 and config["train"]["steps"] == 4 and config["train"]["ep_size"] == 2
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)] == [0, 1, 2, 3]
    assert "mean ± std over seeds [3]" in (out / "stability.md").read_text()

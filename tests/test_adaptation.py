"""Export, surgery and adaptation: consolidating a 2-rank ZeRO-2 / ep 2 run, router-only tuning, pruning, smaller
top-K, continual learning, routing statistics and a two-phase Table-3 mode, on real engines and shards."""
import json

import pytest
import torch
from conftest import run_ranks
from torch.utils.flop_counter import FlopCounterMode

from mthl_ds.adapt import NewDataset, phase_recipe, run_mode, run_phase
from mthl_ds.analysis.stats import RouteRecorder, routing_statistics, write_statistics
from mthl_ds.artifacts import surgery
from mthl_ds.artifacts.export import export_run, load_export, read_metadata, save_export
from mthl_ds.build import build_model
from mthl_ds.config import ConfigError, load_recipe
from mthl_ds.errors import ExportError
from mthl_ds.models.counting import count_parameters
from mthl_ds.moe.gate import PerDatasetGate, RoutingContext
from mthl_ds.moe.layer import MoEMlp

ADAPT_TRAIN = {"steps": 6, "warmup_steps": 1, "workers": 0, "lr": 0.01, "log_every": 1}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """An exported demo model (untrained, single device): the starting point of the adaptation tests."""
    path = tmp_path_factory.mktemp("source") / "demo.safetensors"
    return save_export(path, build_model(load_recipe("demo")), {"note": "fresh demo model"})


def pets(shards, **kw):
    return NewDataset("pets", shards / "pets", (64, 64), batch_size=4, head_channels=64, **kw)


@torch.no_grad()
def outputs(model, inputs):
    model.eval()
    result = {}
    for name, x in inputs.items():
        model.set_dataset(name)
        out = model(x)
        result[name] = out if isinstance(out, torch.Tensor) else torch.cat([t.flatten() for t in out.values()
                                                                            if isinstance(t, torch.Tensor)])
    return result


def fixed_inputs(names=("imagenet", "ade20k")):
    gen = torch.Generator().manual_seed(3)
    return {n: torch.randn(2, 3, 64, 64, generator=gen) for n in names}


# ------------------------------------------------------------------------------------------------- export

def test_export_of_ep2_zero2_run_matches_engine_and_reloads_at_ep_1_and_2(shards, tmp_path):
    run_dir, engine_out, loaded_out = tmp_path / "run", tmp_path / "engine.pt", tmp_path / "loaded.pt"
    run_ranks("export_ranks.py", 2, ["train", str(shards), str(run_dir), str(engine_out)])
    path = export_run(run_dir, tmp_path / "model.safetensors")
    meta = read_metadata(path)
    assert meta["source"]["ep_size"] == 2 and meta["source"]["step"] == 4 and meta["source"]["world_size"] == 2
    assert meta["model"]["experts_per_layer"] == [12] * 5 and meta["model"]["heads"] == ["ade20k", "coco", "imagenet"]
    assert {d: v["top_k"] for d, v in meta["model"]["datasets"].items()} == {"imagenet": 4, "coco": 4, "ade20k": 4}

    import workers.export_ranks as worker  # the same inputs and flattening as the engines used
    model, _ = load_export(path)
    plain = worker.outputs(model, model)
    engine = torch.load(engine_out)
    # float32 rounding: ep_size 2 runs each expert on its stacked slots from both ranks, one rank on its filled
    # slots only, so the matmuls block their sums differently (segmentation logits of about 1e-3 then differ by
    # up to 1.7e-6 with AVX-512 MKL kernels)
    tolerance = {"rtol": 1e-5, "atol": 1e-5}
    for name in engine:
        assert len(plain[name]) == len(engine[name]) > 0
        for a, b in zip(plain[name], engine[name]):
            torch.testing.assert_close(a, b, **tolerance)
    run_ranks("export_ranks.py", 2, ["load", str(shards), str(path), str(loaded_out)])
    loaded = torch.load(loaded_out)
    for ep_size in (1, 2):
        for name in plain:
            for a, b in zip(plain[name], loaded[ep_size][name]):
                torch.testing.assert_close(a, b, **tolerance)


def test_foreign_and_truncated_files_are_refused(source, tmp_path):
    from safetensors.torch import save_file
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(ExportError, match="foreign.safetensors.*not an mthl-ds export"):
        load_export(foreign)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    with pytest.raises(ExportError, match="truncated.safetensors.*truncated"):
        load_export(truncated)
    garbage = tmp_path / "notes.safetensors"
    garbage.write_text("not a model")
    with pytest.raises(ExportError, match="notes.safetensors"):
        load_export(garbage)
    with pytest.raises(ExportError, match="no such file"):
        load_export(tmp_path / "missing.safetensors")


# ---------------------------------------------------------------------------------------------- adaptation

def test_router_only_changes_only_the_new_router_and_head(shards, source, tmp_path):
    recipe = phase_recipe(source, pets(shards), {}, None, ADAPT_TRAIN)
    results, export = run_phase(recipe, tmp_path / "routers")
    assert results["pets"]["metric"] == "top1"
    before = dict(load_export(source)[0].state_dict())
    after_model, meta = load_export(export)
    after = after_model.state_dict()
    assert meta["model"]["routers"] == ["pets"] and meta["model"]["heads"] == ["pets"]
    changed = sorted(k for k in after if k not in before or not torch.equal(before[k], after[k]))
    new_router = [k for k in changed if ".routers.pets." in k]
    head = [k for k in changed if k.startswith("heads.pets.")]
    buffers = [k for k in changed if k.endswith("routing_joint")]
    assert new_router and head and len(buffers) == 5
    assert set(changed) == set(new_router + head + buffers), set(changed) - set(new_router + head + buffers)
    for key in buffers:  # the old datasets' rows of B(D, E) keep their (rescaled) values; only pets' row moved
        m = before[key].shape[0]
        torch.testing.assert_close(after[key][:m], before[key] * m / (m + 1))


def test_frozen_parameters_are_not_given_to_the_optimizer(shards, source, tmp_path):
    from mthl_ds.train import Trainer
    recipe_dict = phase_recipe(source, pets(shards), {"tune_experts": 1}, None, {**ADAPT_TRAIN, "steps": 1})
    (tmp_path / "r.yaml").write_text(__import__("yaml").safe_dump(recipe_dict))
    trainer = Trainer(load_recipe(str(tmp_path / "r.yaml")), tmp_path / "run")
    trainer.run()
    in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    named = dict(trainer.model.named_parameters())
    trainable = {n for n, p in named.items() if p.requires_grad}
    assert in_optimizer == {id(named[n]) for n in trainable}
    for layer in trainer.model.backbone.moe_layers:  # one expert of each MoE layer, in a bank of its own
        assert layer.mlps.trainable().count(True) == 1
        assert len([p for _, p in layer.expert_parameters() if p.requires_grad]) == 4  # fc1/fc2 weight and bias


def moe_layer(num_experts=8, k=2, dim=16):
    torch.manual_seed(0)
    ctx = RoutingContext(dataset="a")
    gate = PerDatasetGate(dim, num_experts, ["a", "b"], {"a": k, "b": k}, drop_tokens=False, context=ctx)
    layer = MoEMlp(dim, 32, num_experts, gate)
    layer.init_weights(seed=1)
    return layer.eval()


@torch.no_grad()
def test_pruning_keeps_exactly_the_kept_experts_and_leaves_other_tokens_unchanged():
    layer = moe_layer()
    x = torch.randn(64, 16)
    before = layer(x)
    routed = layer.gate(x)[3].long().t()  # (tokens, K) experts each token went to
    weights = layer.mlps.stacks()[0].clone()  # fc1's weights
    pruned = {1, 6}
    kept = [e for e in range(8) if e not in pruned]
    layer.keep_experts(kept)
    assert layer.num_experts == layer.mlps.num_local_experts == 6 and layer.gate.routing_joint.shape == (2, 6)
    assert torch.equal(layer.mlps.stacks()[0], weights[kept])
    assert layer.gate.routers["a"].choices.tolist() == [0, -1, 1, 2, 3, 4, -1, 5]
    after = layer(x)
    untouched = ~torch.isin(routed, torch.tensor(sorted(pruned))).any(1)
    assert 0 < untouched.sum() < len(x)
    torch.testing.assert_close(after[untouched], before[untouched], rtol=0, atol=1e-6)
    assert not torch.allclose(after[~untouched], before[~untouched])
    assert (layer.gate(x)[3] < 6).all()


def test_threshold_pruning_leaves_layers_of_different_widths_that_train():
    model = build_model(load_recipe("demo"))
    layers = len(model.backbone.moe_layers)
    surgery.apply(model, [{"op": "keep_experts", "kept": [list(range(12 - i)) for i in range(layers)]}])
    assert [layer.num_experts for layer in model.backbone.moe_layers] == [12 - i for i in range(layers)]
    model.train()
    model.set_dataset("imagenet")
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    before = [layer.gate.routing_joint.clone() for layer in model.backbone.moe_layers]
    model.backbone.update_routing_buffers()
    for layer, old in zip(model.backbone.moe_layers, before):
        assert layer.gate.routing_joint.shape == old.shape and not torch.equal(layer.gate.routing_joint[0], old[0])


def test_pruning_below_top_k_is_refused_and_changes_nothing():
    model = build_model(load_recipe("demo"))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    layers = len(model.backbone.moe_layers)
    with pytest.raises(surgery.SurgeryError, match="MoE layer 0.*3 experts.*top_k=4"):
        surgery.apply(model, [{"op": "keep_experts", "kept": [[0, 1, 2]] * layers}])
    assert model.surgery == [] and all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_smaller_top_k_reduces_measured_flops_as_computed():
    model = build_model(load_recipe("demo"))
    surgery.apply(model, [{"op": "add_dataset", "name": f"k{k}", "task": "classification", "num_classes": 5,
                           "top_k": k} for k in (4, 2, 1)])
    model.eval()
    tokens = []
    hooks = [layer.gate.register_forward_hook(lambda g, i, o: tokens.append(i[0].shape[0]))
             for layer in model.backbone.moe_layers]
    flops = {}
    for k in (4, 2, 1):
        model.set_dataset(f"k{k}")
        with FlopCounterMode(display=False) as counter:
            model.backbone(torch.zeros(1, 3, 64, 64))
        flops[k] = counter.get_total_flops()
    for h in hooks:
        h.remove()
    per_layer = tokens[:len(model.backbone.moe_layers)]

    def expert_flops(k):  # in eval no route is dropped and each expert runs only its routed rows (s * K in all)
        return sum(s * k * 4 * layer.dim * layer.hidden for layer, s in zip(model.backbone.moe_layers, per_layer))
    assert flops[4] > flops[2] > flops[1]
    assert flops[4] - flops[2] == expert_flops(4) - expert_flops(2)
    assert flops[2] - flops[1] == expert_flops(2) - expert_flops(1)


def test_continual_learning_keeps_old_outputs_bit_identical(shards, source, tmp_path):
    inputs = fixed_inputs()
    old_model, _ = load_export(source)
    reference = outputs(old_model, inputs)
    from mthl_ds.cli import main
    assert main(["expand", str(source), "--add-experts", "2", "--dataset", "pets", "--data", str(shards / "pets"),
                 "--out", str(tmp_path / "expand"), "--steps", "6", "--lr", "0.01", "--workers", "0",
                 "--batch-size", "4"]) == 0
    model, meta = load_export(tmp_path / "expand" / "model.safetensors")
    assert meta["model"]["experts_per_layer"] == [14] * 5 and "imagenet" in meta["model"]["heads"]
    after = outputs(model, inputs)
    for name in reference:
        assert torch.equal(reference[name], after[name]), name
    trained = model.state_dict()
    fresh = load_export(source)[0]
    surgery.apply(fresh, [{"op": "add_experts", "count": 2, "seed": 0}])
    new_expert = [k for k in trained if ".deepspeed_experts.12." in k]
    assert any(not torch.equal(trained[k], fresh.state_dict()[k]) for k in new_expert)  # the new experts learned
    for layer in model.backbone.moe_layers:
        for name, router in layer.gate.routers.items():
            assert (router.choices.max() >= 12) == (name == "pets"), name
    with RouteRecorder(model) as recorder:
        for name, x in inputs.items():
            model.set_dataset(name)
            model.backbone(x)
        assert all(not chosen[:, 12:].any() for chosen in recorder.take())


def test_routing_statistics_and_heatmaps(shards, source, tmp_path):
    from mthl_ds.data.reader import ShardSet
    model, _ = load_export(source)
    data = {"imagenet": ShardSet.open(shards / "imagenet" / "val"), "ade20k": ShardSet.open(shards / "ade20k" / "val")}
    stats = routing_statistics(model, data, {"imagenet": (64, 64), "ade20k": (64, 64)}, batch_size=8,
                               max_images=8, progress=lambda _: None)
    assert stats["images"] == {"imagenet": 8, "ade20k": 8}
    first = stats["layers"][0]
    assert sum(first["usage"]["imagenet"]) == 8 * 256 * 4  # every token of the 64 px input routed to K = 4
    sim = torch.tensor(first["similarity"])
    assert sim.shape == (3, 3) and torch.allclose(sim.diagonal(), torch.ones(3)) and (sim <= 1).all()
    paths = write_statistics(stats, tmp_path / "stats")
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths) and len(paths) == 3
    from mthl_ds.cli import main
    assert main(["stats", str(source), "--data", f"ade20k={shards / 'ade20k'}", "--split", "val", "--max-images", "4",
                 "--out", str(tmp_path / "cli")]) == 0
    written = json.loads((tmp_path / "cli" / "routing_stats.json").read_text())
    assert written["images"] == {"ade20k": 4} and sum(written["layers"][-1]["usage"]["ade20k"]) == 4 * 4 * 4


def test_two_phase_prune_mode_reports_table3_figures(shards, source, tmp_path):
    row = run_mode(source, pets(shards), "hybrid_b", tmp_path / "hybrid_b", {**ADAPT_TRAIN, "steps": 3},
                   stats_images=16)
    usage = json.loads((tmp_path / "hybrid_b" / "phase1" / "stats" / "routing_stats.json").read_text())
    assert sum(usage["layers"][0]["usage"]["pets"]) == 16 * 256 * 4
    model, meta = load_export(tmp_path / "hybrid_b" / "phase2" / "model.safetensors")
    assert meta["model"]["experts_per_layer"] == [4] * 5 and meta["model"]["datasets"]["pets"]["top_k"] == 3
    routers = load_export(tmp_path / "hybrid_b" / "phase1" / "model.safetensors")[0]
    assert row["model_params"] < count_parameters(routers)
    assert 0 < row["trainable_params"] < row["model_params"] and row["flops"] > 0 and row["metric"] == "top1"
    assert [r["op"] for r in meta["surgery"]] == ["add_dataset", "drop_dataset", "drop_dataset", "drop_dataset",
                                                 "keep_experts", "set_top_k"]


def test_adapt_recipe_errors_name_the_key(shards, source):
    with pytest.raises(ConfigError, match="adapt.usage"):
        load_recipe("demo", ["adapt.source=x.safetensors", "adapt.prune_fraction=0.5"])
    with pytest.raises(ConfigError, match="adapt.source"):
        load_recipe("demo", ["adapt.freeze_backbone=false"])


def test_export_cli_refuses_a_run_without_checkpoint(tmp_path, capsys):
    from mthl_ds.cli import main
    assert main(["export", str(tmp_path / "empty_run"), "--out", str(tmp_path / "m.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "empty_run has no complete checkpoint" in err and not (tmp_path / "m.safetensors").exists()

"""The companion methods: AdaMV-MoE's adaptive expert selection (AES) and ViT placements, Mod-Squad's MoE
attention, and the routing analysis of `mthl-ds stats` (Hamming convergence, gradient cosine, expert maps)."""
import copy
import json
import math
import shutil

import pytest
import torch
from conftest import demo_overrides, train_cli

from mthl_ds.aes import AdaptiveTopK, heldout_positions
from mthl_ds.analysis.stats import (RouteRecorder, expert_maps, gradient_cosine, plot_expert_maps, routing_convergence,
                                    routing_statistics, shared_parameters, token_grid, usage_of)
from mthl_ds.artifacts.checkpoint import consolidate
from mthl_ds.artifacts.export import export_run, load_export, read_metadata
from mthl_ds.build import build_model
from mthl_ds.config import load_recipe
from mthl_ds.data.pipelines import eval_loader, make_decoder
from mthl_ds.data.reader import EvalStream, ShardSet, TrainStream
from mthl_ds.evaluate import pipeline_config
from mthl_ds.models.backbone import resolve_layers
from mthl_ds.moe.attention import MoEAttention
from mthl_ds.moe.gate import PerDatasetGate, RoutingContext
from mthl_ds.train import open_shards

# ------------------------------------------------------------------------------------------ AES, by hand


def test_aes_reaches_the_k_algorithm_1_gives_on_scripted_losses():
    """Patience 4, a check every 2 steps. Dataset "a": best 4.0 at step 4, none for 4 steps (K 1 -> 2 at step 8),
    a new best at K=2 (step 12), none for 4 steps (K 2 -> 3 at step 16), no new best at K=3 (step 20): K steps
    back to 2 and stays. Dataset "b" never improves after step 2: it grows at step 6 and steps back at step 10."""
    losses = {"a": [5.0, 4.0, 4.5, 4.1, 4.2, 3.0, 3.5, 3.1, 3.2, 3.3, 3.05, 3.4, 2.0, 2.5],
              "b": [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0, 0.0, 0.0]}
    aes = AdaptiveTopK({"a": 1, "b": 1}, max_k=8, patience=4)
    changes, k_at = [], {}
    for i in range(14):
        step = 2 * (i + 1)
        changes += aes.observe(step, {n: v[i] for n, v in losses.items() if not aes.datasets[n].fixed})
        k_at[step] = aes.top_k
    assert [(c["step"], c["dataset"], c["k_from"], c["k_to"], c["action"]) for c in changes] == [
        (6, "b", 1, 2, "grow"), (8, "a", 1, 2, "grow"), (10, "b", 2, 1, "step back and fix"),
        (16, "a", 2, 3, "grow"), (20, "a", 3, 2, "step back and fix")]
    assert k_at[28] == {"a": 2, "b": 1} and aes.done
    # the losses that caused a change are logged with it
    assert changes[1]["loss"] == 4.1 and changes[1]["best"] == 4.0
    # the state survives a round trip (it is saved in every checkpoint)
    again = AdaptiveTopK({"a": 1, "b": 1}, max_k=8, patience=4)
    again.load_state_dict(json.loads(json.dumps(aes.state_dict())))
    assert again == aes


def test_aes_fixes_k_at_the_number_of_experts():
    aes = AdaptiveTopK({"a": 1}, max_k=2, patience=1)
    assert [c["action"] for s in range(1, 6) for c in aes.observe(s, {"a": 1.0 - 0.1 * (s == 3)})] == [
        "grow", "fix"]
    assert aes.top_k == {"a": 2} and aes.done


def test_heldout_split_is_fixed_and_never_trained_on(shards):
    train = ShardSet.open(shards / "coco" / "train")
    counts = [s["num_samples"] for s in train.shards]
    held = heldout_positions(counts, 0.1, seed=3, at_least=2)
    assert held == heldout_positions(counts, 0.1, seed=3, at_least=2) != heldout_positions(counts, 0.1, seed=4)
    assert sum(map(len, held.values())) == round(0.1 * sum(counts))
    decode = make_decoder(pipeline_config(load_recipe("demo"), "coco"), train=False)
    trained = set()
    for rank in range(2):
        stream = iter(TrainStream(train, lambda s, rng: {"key": s["__key__"]}, rank, 2, seed=0, exclude=held))
        trained |= {next(stream)["key"] for _ in range(3 * len(train))}  # several epochs
    evaluated = {s["__key__"] for s in EvalStream(train, lambda s, rng: dict(s), only=held)}
    assert len(evaluated) == sum(map(len, held.values())) and not evaluated & trained
    assert len(trained) == len(train) - len(evaluated)
    assert sum(len(b["image"]) for b in eval_loader(train, decode, 4, only=held)) >= len(evaluated)


# ------------------------------------------------------------------------------ placements and MoE attention

def test_adamv_placements_take_half_the_layers():
    assert resolve_layers("early", 12) == tuple(range(6))
    assert resolve_layers("middle", 12) == tuple(range(3, 9))
    assert resolve_layers("later", 12) == tuple(range(6, 12))
    assert resolve_layers("every_second", 12) == (1, 3, 5, 7, 9, 11)
    with pytest.raises(ValueError, match="'late'"):
        resolve_layers("late", 12)


def attention_layer(dim=16, experts=6, k=2, head=4, seed=0):
    context = RoutingContext(dataset="a")
    gate = PerDatasetGate(dim, experts, ["a"], {"a": k}, drop_tokens=False, context=context)
    torch.nn.init.normal_(gate.routers["a"].proj.weight, std=1.0, generator=torch.Generator().manual_seed(seed))
    return MoEAttention(dim, experts, head, gate, seed=seed)


def test_moe_attention_is_the_per_token_top_k_mixture_and_unchosen_experts_get_no_gradient():
    torch.manual_seed(0)
    layer = attention_layer(experts=16).eval()
    x = torch.randn(2, 3, 16)
    out = layer(x)
    _, _, _, indices, _, gates, _ = layer.gate(x.reshape(6, 16))
    h = layer.head_dim
    kv = layer.key_value(x)
    expected = torch.zeros_like(x)
    for b in range(2):
        key, value = kv[b, :, :h], kv[b, :, h:]
        for t in range(3):
            token = b * 3 + t
            total = layer.out.bias.clone()
            for k in range(indices.shape[0]):
                e = int(indices[k, token])
                q = layer.query(x[b, t])[e * h:(e + 1) * h]
                attended = torch.softmax(key @ q / math.sqrt(h), dim=0) @ value
                total = total + gates[k, token] * (layer.out.weight[:, e * h:(e + 1) * h] @ attended)
            expected[b, t] = total
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    # 6 tokens x K=2 routes over 16 experts: gradients reach exactly the experts that were chosen
    layer.zero_grad()
    out.square().sum().backward()
    chosen = set(indices.flatten().tolist())
    for e in range(16):
        rows = layer.query.weight.grad[e * h:(e + 1) * h]
        cols = layer.out.weight.grad[:, e * h:(e + 1) * h]
        assert bool(rows.any()) == bool(cols.any()) == (e in chosen), e


def test_moe_attention_model_has_mi_loss_and_no_expert_named_routers():
    model = build_model(load_recipe("demo_modsquad"))
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    assert not [n for n in names if ("router" in n or "routing" in n) and "expert" in n]
    assert len(model.backbone.attention_layers) == 4 and len(model.backbone.gates) == 8
    model.train()
    model.set_dataset("coco")
    model(torch.randn(2, 3, 64, 64))
    assert "mi" in model.backbone.router_loss_terms() and "attention/mi" in model.backbone.router_loss_terms()


# ------------------------------------------------------------------------- 2 ranks, ep_size 2: AES and training

def read_rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@torch.no_grad()
def val_losses(model, recipe, shards, batches=2):
    """Mean task loss of each dataset over its first val batches."""
    model.eval()
    losses = {}
    for name, (_, val) in open_shards(recipe, 1).items():
        model.set_dataset(name)
        values = []
        for batch in eval_loader(val, make_decoder(pipeline_config(recipe, name), train=False), 4):
            values.append(float(model.heads[name].loss(model(batch["image"]), batch)[0]))
            if len(values) == batches:
                break
        losses[name] = sum(values) / len(values)
    return losses


def test_vit_adamv_recipe_trains_with_ep2_and_aes_agrees_survives_resume_and_export(shards, tmp_path):
    """demo_adamv (vit_debug, E=8, importance + load losses, AES) on 2 ranks with ep_size 2. A check every 2
    steps with a patience of 4 makes AES change K within 24 steps; every 2 steps is a checkpoint."""
    overrides = demo_overrides(shards, steps=24, ckpt_every=2, keep_checkpoints=12, **{"aes.every": 2,
                                                                                      "aes.patience": 4})
    straight = tmp_path / "straight"
    train_cli(straight, overrides, recipe="demo_adamv")
    recipe = load_recipe("demo_adamv", overrides)
    assert recipe.train.ep_size == 2
    rows = read_rows(straight)
    checks = {r["step"]: r["aes"] for r in rows if "aes" in r}
    changes = [c for a in checks.values() for c in a["changes"]]
    assert changes and any(c["k_to"] > c["k_from"] for c in changes), checks
    for c in changes:  # logged with the step and the losses that caused it
        assert checks[c["step"]]["heldout_loss"][c["dataset"]] == c["loss"] and c["loss"] >= c["best"]
    # both ranks hold the same AES state at every checkpoint, and their gates were changed at the same step
    ckpts = sorted((straight / "checkpoints").glob("step*"))
    grown = None
    for ckpt in ckpts:
        states = [torch.load(ckpt / f"rank{r}_state.pt", weights_only=False)["aes"] for r in (0, 1)]
        assert states[0] == states[1], ckpt.name
        step = int(ckpt.name[4:])
        k = {n: s["k"] for n, s in states[0].items()}
        assert k == checks[step]["top_k"]
        if grown is None and any(v > 1 for v in k.values()):
            grown = ckpt
    assert grown is not None, "no checkpoint holds a grown K"
    # K survives export: the metadata and the loaded gates carry the checkpoint's K
    k = checks[int(grown.name[4:])]["top_k"]
    path = export_run(straight, tmp_path / "grown.safetensors", tag=grown.name)
    assert {n: d["top_k"] for n, d in read_metadata(path)["model"]["datasets"].items()} == k
    model, _ = load_export(path)
    assert all(gate.top_k == k for gate in model.backbone.gates)
    # ... and resume: stopped at the checkpoint with the grown K, the run makes the same later decisions
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    for later in [c for c in ckpts if c.name > grown.name]:
        shutil.rmtree(resumed / "checkpoints" / later.name)
    (resumed / "checkpoints" / "latest_complete").write_text(grown.name + "\n")
    proc = train_cli(resumed, overrides, recipe="demo_adamv")
    assert f"at step {int(grown.name[4:])}" in proc.stderr
    again = read_rows(resumed)
    assert [r for r in again if "aes" in r] == [r for r in rows if "aes" in r]
    assert [(r["step"], r["loss"]) for r in again if "loss" in r] == [
             (r["step"], r["loss"]) for r in rows if "loss" in r]
    # `mthl-ds stats` on checkpoint folders: convergence against an earlier one, gradient cosine, expert maps
    from mthl_ds.cli import main
    out = tmp_path / "stats"
    assert main(["stats", str(grown), "--data", f"imagenet={shards / 'imagenet'}", "--data", f"coco={shards / 'coco'}",
                 "--split", "val", "--max-images", "8", "--compare", str(ckpts[0]), "--grad-cosine", "imagenet,coco",
                 "--grad-batches", "1", "--maps", "2", "--out", str(out)]) == 0
    hamming = json.loads((out / "hamming.json").read_text())
    assert hamming["checkpoints"] == [f"straight/{grown.name}", f"straight/{ckpts[0].name}"]
    for layer in hamming["layers"]:
        for share in layer["share"].values():
            assert share[0][0] == share[1][1] == 0 and 0 < share[0][1] <= 1
    assert -1 <= json.loads((out / "grad_cosine.json").read_text())["batches"][0]["overall"] <= 1
    assert all((out / f).stat().st_size > 0 for f in ("hamming.png", "grad_cosine.png", "expert_maps.png"))
    # the ViT learned: every dataset's val loss is below the same model's at initialisation
    before = val_losses(build_model(recipe), recipe, shards)
    after = val_losses(consolidate(straight)[0], recipe, shards)
    assert all(after[n] < before[n] for n in before), (before, after)


def test_moe_attention_recipe_trains_with_ep2(shards, tmp_path):
    overrides = demo_overrides(shards, steps=30, ckpt_every=30)
    run_dir = tmp_path / "modsquad"
    train_cli(run_dir, overrides, recipe="demo_modsquad")
    recipe = load_recipe("demo_modsquad", overrides)
    assert recipe.train.ep_size == 2 and recipe.model.moe.attention is not None
    rows = [r for r in read_rows(run_dir) if "loss" in r]
    assert all(math.isfinite(r["router/attention/mi"]) for r in rows)
    before = val_losses(build_model(recipe), recipe, shards)
    after = val_losses(consolidate(run_dir)[0], recipe, shards)
    assert all(after[n] < before[n] for n in before), (before, after)


# ---------------------------------------------------------------------------------------- routing analysis

def val_sets(shards, *names):
    return {n: ShardSet.open(shards / n / "val") for n in names}


def test_hamming_of_a_model_against_itself_is_zero_and_against_a_reinitialised_router_is_not(shards):
    model = build_model(load_recipe("demo"))
    other = copy.deepcopy(model)
    torch.nn.init.normal_(other.backbone.moe_layers[0].gate.routers["imagenet"].proj.weight, std=1.0)
    sizes = {"imagenet": (64, 64), "ade20k": (64, 64)}
    result = routing_convergence({"model": model, "same": copy.deepcopy(model), "new router": other},
                                 val_sets(shards, "imagenet", "ade20k"), sizes, batch_size=4, max_images=8,
                                 progress=lambda _: None)
    assert result["checkpoints"] == ["model", "same", "new router"] and len(result["layers"]) == 5
    for layer in result["layers"]:
        for name in ("imagenet", "ade20k"):
            share, hamming = torch.tensor(layer["share"][name]), torch.tensor(layer["hamming"][name])
            assert share[0, 1] == hamming[0, 1] == 0 and torch.equal(share, share.T) and (share <= 1).all()
    first = result["layers"][0]
    assert first["share"]["imagenet"][0][2] > 0.3 and first["hamming"]["imagenet"][0][2] > 1  # K = 4 of 12
    assert first["share"]["ade20k"][0][2] == 0  # its router and its input are unchanged in the first layer


def test_gradient_cosine_on_shared_parameters(shards):
    model = build_model(load_recipe("demo"))
    shared = shared_parameters(model)
    assert not [n for n in shared if "routers" in n or "deepspeed_moe.experts" in n]
    assert any("patch_embed" in n for n in shared) and any(".mlp." not in n for n in shared)
    sizes = {"imagenet": (64, 64), "ade20k": (64, 64)}
    result = gradient_cosine(model, val_sets(shards, "imagenet", "ade20k"), sizes, batches=2, batch_size=4)
    assert len(result["batches"]) == 2 and result["parameters"] == sum(p.numel() for p in shared.values())
    for row in result["batches"]:
        assert -1 <= row["overall"] <= 1 and row["per_tensor"]
    one = gradient_cosine(model, val_sets(shards, "imagenet", "ade20k"), sizes, batches=1, batch_size=4,
                          pattern=r"^net\.patch_embed\.proj\.weight$")
    assert one["tensors"] == 1 and one["batches"][0]["overall"] == pytest.approx(
        one["batches"][0]["per_tensor"]["net.patch_embed.proj.weight"])


def test_expert_maps_of_moe_attention_give_two_distinct_experts_per_patch(shards, tmp_path):
    assert token_grid(256, (64, 64)) == (16, 16) and token_grid(17, (64, 64), prefix=1) == (4, 4)
    with pytest.raises(ValueError, match="17 tokens"):
        token_grid(17, (64, 64))
    model = build_model(load_recipe("demo_modsquad"))
    with RouteRecorder(model) as recorder:  # records per gate, though attention and MLP gates fire interleaved
        model.set_dataset("coco")
        model.backbone(torch.randn(1, 3, 64, 64))
        assert [r.shape[1] for r in recorder.take_ranked()] == [4] * 4 + [6] * 4
    result = expert_maps(model, val_sets(shards, "coco"), {"coco": (64, 64)}, count=2, layer=-1)
    assert result["layer"] == "attention 3" and result["experts"] == 15 and len(result["maps"]) == 2
    for m in result["maps"]:
        assert m["top1"].shape == m["top2"].shape == (4, 4) and m["image"].shape == (3, 64, 64)
        assert (m["top1"] != m["top2"]).all() and m["top1"].max() < 15 and m["top2"].min() >= 0
    stats = routing_statistics(model, val_sets(shards, "coco"), {"coco": (64, 64)}, batch_size=4, max_images=4,
                               progress=lambda _: None)
    assert [layer["name"] for layer in stats["layers"]][3:5] == ["moe 3", "attention 0"]
    assert [len(u) for u in usage_of(stats, "coco")] == [16] * 4  # what pruning reads: the MoE MLPs only
    plot_expert_maps(result, tmp_path / "maps.png")
    assert (tmp_path / "maps.png").stat().st_size > 0


def test_stats_refuses_a_bad_layer_or_a_different_model_before_any_work(shards, tmp_path, capsys):
    from mthl_ds.artifacts.export import save_export
    from mthl_ds.cli import main
    demo = save_export(tmp_path / "demo.safetensors", build_model(load_recipe("demo")), {})
    squad = save_export(tmp_path / "squad.safetensors", build_model(load_recipe("demo_modsquad")), {})
    common = ["--data", f"coco={shards / 'coco'}", "--split", "val", "--out", str(tmp_path / "out")]
    assert main(["stats", str(demo), *common, "--maps", "1", "--map-layer", "5"]) == 2
    assert "--map-layer 5" in capsys.readouterr().err
    assert main(["stats", str(demo), *common, "--compare", str(squad)]) == 2
    assert f"--compare {squad}" in capsys.readouterr().err
    assert main(["stats", str(demo), *common, "--grad-cosine", "coco,ade20k"]) == 2
    assert "--grad-cosine 'coco,ade20k'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

"""moeify on the six paper backbones, the debug flavours, upcycling, recomputation and bad input."""
import pytest
import torch
from conftest import ROOT
from timm.layers import Mlp

from mthl_ds.config import MoEConfig
from mthl_ds.models.backbone import build_backbone, create_timm, mlp_blocks
from mthl_ds.moe.gate import PerDatasetGate, RoutingContext
from mthl_ds.moe.layer import MoEMlp

# MLPs per backbone counted from timm's own structure, and the paper's MoE count (all for T/S, half for B).
PAPER = {
    "swin_tiny_patch4_window7_224": 12, "swin_small_patch4_window7_224": 24, "swin_base_patch4_window7_224": 12,
    "davit_tiny": 12, "davit_small": 24, "davit_base": 12,
}


def timm_mlp_count(net):
    if hasattr(net, "layers"):  # Swin: one MLP per block
        return sum(len(stage.blocks) for stage in net.layers)
    return sum(2 * len(stage.blocks) for stage in net.stages)  # DaViT: spatial + channel block per entry


@pytest.mark.parametrize("name", sorted(PAPER))
def test_moeify_replaces_paper_placement(name):
    dense = create_timm(name, 224)
    dense_blocks = mlp_blocks(dense)
    assert len(dense_blocks) == timm_mlp_count(dense)
    assert all(isinstance(b.mlp, Mlp) for b in dense_blocks)
    model = build_backbone(name, ["imagenet", "coco"], MoEConfig())
    blocks = mlp_blocks(model.net)
    kinds = [type(b.mlp) for b in blocks]
    assert kinds.count(MoEMlp) == PAPER[name] == len(model.moe_layers)
    assert kinds.count(Mlp) == len(blocks) - PAPER[name]
    if PAPER[name] < len(blocks):  # every second MLP: indices 1, 3, 5, ...
        assert [i for i, k in enumerate(kinds) if k is MoEMlp] == list(range(1, len(blocks), 2))
    layer = model.moe_layers[0]
    dense_hidden = dense_blocks[0].mlp.fc1.out_features if PAPER[name] == len(
        blocks) else dense_blocks[1].mlp.fc1.out_features
    assert layer.num_experts == 12 and layer.gate.top_k == {"imagenet": 4, "coco": 4}
    assert layer.hidden == dense_hidden // 4


def test_dense_twin_is_timm():
    model = build_backbone("swin_tiny_patch4_window7_224", ["a"], None)
    dense = create_timm("swin_tiny_patch4_window7_224", 224)
    assert not model.moe_layers
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in dense.parameters())


def test_explicit_layer_tuple_and_forward_shapes():
    model = build_backbone("davit_debug", ["a"], MoEConfig(layers=(0, 3, 5), num_experts=4, top_k=2), img_size=64)
    kinds = [type(b.mlp) for b in mlp_blocks(model.net)]
    assert [i for i, k in enumerate(kinds) if k is MoEMlp] == [0, 3, 5]
    model.set_dataset("a")
    feats = model(torch.randn(2, 3, 64, 64))
    assert [f.shape[1] for f in feats] == model.stage_channels == [32, 64, 128, 256]


def test_same_model_for_any_ep_size():
    full = build_backbone("swin_debug", ["a"], MoEConfig(num_experts=4, top_k=2), img_size=64, seed=5)
    halves = [build_backbone("swin_debug", ["a"], MoEConfig(num_experts=4, top_k=2), img_size=64, seed=5,
                             ep_size=2, ep_rank=r) for r in (0, 1)]
    for layer_full, layer0, layer1 in zip(full.moe_layers, halves[0].moe_layers, halves[1].moe_layers):
        for whole, halves_ in zip(layer_full.mlps.stacks(), zip(layer0.mlps.stacks(), layer1.mlps.stacks())):
            assert torch.equal(whole, torch.cat(halves_))
    fc1 = full.moe_layers[0].mlps.stacks()[0]
    assert not torch.equal(fc1[0], fc1[1]), "experts must not share an init"


@pytest.mark.parametrize("mode,top_k,num_experts", [("copy", 2, 6), ("split", 4, 4)])
def test_upcycled_layer_reproduces_dense_mlp(mode, top_k, num_experts):
    torch.manual_seed(0)
    dense = Mlp(16, 64)
    hidden = 64 if mode == "copy" else 16
    ctx = RoutingContext(dataset="a")
    gate = PerDatasetGate(16, num_experts, ["a"], {"a": top_k}, renormalize=True, capacity_factor=num_experts,
                          context=ctx)
    if mode == "split":  # a zero router spreads every token evenly; ties go to experts 0..K-1, one per chunk
        torch.nn.init.zeros_(gate.routers["a"].proj.weight)
    layer = MoEMlp(16, hidden, num_experts, gate)
    layer.upcycle(dense, mode, top_k)
    x = torch.randn(4, 7, 16)
    torch.testing.assert_close(layer(x), dense(x), rtol=1e-5, atol=1e-5)


def test_upcycle_refuses_mismatched_widths():
    gate = PerDatasetGate(16, 4, ["a"], {"a": 2})
    with pytest.raises(ValueError, match="copy.*hidden 8.*64"):
        MoEMlp(16, 8, 4, gate).upcycle(Mlp(16, 64), "copy", 2)


def test_recomputed_blocks_record_routing_once():
    def one_step(checkpointing):
        model = build_backbone("swin_debug", ["a", "b"], MoEConfig(num_experts=4, top_k=2), img_size=64, seed=1)
        model.net.set_grad_checkpointing(checkpointing)
        model.train()
        model.set_dataset("b")
        feats = model(torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
        loss = sum(f.mean() for f in feats) + model.router_loss()
        model.update_routing_buffers()
        loss.backward()
        assert all(layer.gate.pending_usage is None for layer in model.moe_layers), "recompute recorded again"
        model.update_routing_buffers()
        return [layer.gate.routing_joint.clone() for layer in model.moe_layers]

    for plain, recomputed in zip(one_step(False), one_step(True)):
        torch.testing.assert_close(plain, recomputed)
        assert not torch.allclose(plain[1], torch.full_like(plain[1], 1 / 8)), "dataset b's row must move"


@pytest.mark.parametrize("backbone", ["swin_debug", "davit_debug", "vit_debug"])
def test_grad_checkpointing_gives_the_gradients_of_the_run_without_it(backbone):
    """model.grad_checkpointing: two steps of a whole model (MoE MLPs, MI loss, every head), B(D, E) folded after
    each backward as the trainer does: routing recorded once per forward, gradients equal to the plain run's. Folded
    before the backward instead, the recomputed blocks would see the moved buffer and the MI gradient would differ."""
    from conftest import demo_overrides

    from mthl_ds.build import build_model
    from mthl_ds.config import load_recipe
    from mthl_ds.tasks import fake_batch

    def run(checkpointing, fold_first=False):
        recipe = load_recipe("demo", demo_overrides(ROOT, ep_size=1) + [
            f"model.backbone={backbone}", f"model.grad_checkpointing={str(checkpointing).lower()}",
            "model.moe.losses={mi: 1.0}", "datasets.coco.batch_size=2"])
        model = build_model(recipe)
        model.train()
        grads = []
        for name in ("coco", "imagenet"):
            batch = fake_batch(recipe, name, seed=3)
            model.set_dataset(name)
            model.zero_grad(set_to_none=True)
            loss = model.heads[name].loss(model(batch["image"]), batch)[0] + model.backbone.router_loss()
            if fold_first:
                model.backbone.update_routing_buffers()
            loss.backward()
            assert all(g.pending_usage is None for g in model.backbone.gates) == fold_first, "recorded twice"
            model.backbone.update_routing_buffers()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        return grads

    plain, checkpointed = run(False), run(True)
    for a, b in zip(plain, checkpointed):
        assert a.keys() == b.keys() and any(".routers." in n for n in a)
        for n in a:
            torch.testing.assert_close(a[n], b[n], rtol=1e-5, atol=1e-7, msg=n)
    moved = run(True, fold_first=True)[1]
    router = next(n for n in plain[1] if ".routers.imagenet." in n)
    assert not torch.allclose(moved[router], plain[1][router], rtol=1e-5, atol=1e-7)


def test_bad_input_is_refused_with_the_value():
    with pytest.raises(ValueError, match="top_k=13.*num_experts=12"):
        PerDatasetGate(8, 12, ["a"], {"a": 13})
    with pytest.raises(ValueError, match="num_experts=12 is not divisible by ep_size=5"):
        MoEMlp(8, 8, 12, PerDatasetGate(8, 12, ["a"], {"a": 2}), ep_size=5)
    model = build_backbone("swin_debug", ["imagenet"], MoEConfig(num_experts=4, top_k=2), img_size=64)
    with pytest.raises(RuntimeError, match="set_dataset"):
        model(torch.randn(1, 3, 64, 64))
    with pytest.raises(KeyError, match="'cifar'.*imagenet"):
        model.set_dataset("cifar")
    with pytest.raises(ValueError, match="load loss needs noisy gating"):
        PerDatasetGate(8, 4, ["a"], {"a": 2}, loss_coefs={"load": 0.01})
    with pytest.raises(ValueError, match="dataset name 'a.b'"):
        PerDatasetGate(8, 4, ["a.b"], {"a.b": 2})


def test_router_loss_sums_every_gates_weighted_losses():
    """The batched router loss (one stacked sum per coefficient) equals the sum of each gate's weighted losses, with
    three coefficients over MoE MLPs and MoE attention; the logged terms are the per-name sums."""
    from mthl_ds.build import build_model
    from mthl_ds.config import load_recipe
    model = build_model(load_recipe("demo_modsquad", ["model.moe.attention.losses={zloss: 0.05, mi: 0.02}"]))
    model.train()
    model.set_dataset("coco")
    model(torch.randn(2, 3, 64, 64))
    gates = model.backbone.gates
    assert {c for g in gates for c in g.loss_coefs.values()} == {0.01, 0.02, 0.05}
    expected = sum(g.weighted_loss() for g in gates)
    torch.testing.assert_close(model.backbone.router_loss(), expected, rtol=1e-6, atol=0)
    terms = model.backbone.router_loss_terms()
    assert set(terms) == {"mi", "attention/mi", "attention/zloss"}
    by_hand = sum(layer.gate.losses["zloss"] for layer in model.backbone.attention_layers)
    torch.testing.assert_close(terms["attention/zloss"], by_hand.detach(), rtol=1e-6, atol=0)


def test_a_loaded_state_gives_the_mi_weights_the_fold_gave():
    """The fold after a step keeps every gate's MI weights, so the next forward computes none; a state dict loaded
    into the model (a resume) makes them stale, and the next training forward computes them for all gates at once,
    bitwise as the fold did for the same buffers."""
    from mthl_ds.build import build_model
    from mthl_ds.config import load_recipe
    from mthl_ds.studies.bench.launches import LaunchCount
    model = build_model(load_recipe("demo"))
    model.train()
    model.set_dataset("imagenet")
    x = torch.randn(2, 3, 64, 64)
    model(x)
    model.backbone.update_routing_buffers()
    gates = model.backbone.gates
    folded = [g.mi_weights().clone() for g in gates]
    assert all(g.mi_weights_current() for g in gates)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(saved)
    assert not any(g.mi_weights_current() for g in gates)
    model(x)
    assert all(torch.equal(g.mi_weights(), w) for g, w in zip(gates, folded))
    assert len({g.mi_weights().untyped_storage().data_ptr() for g in gates}) == 1  # one pass for all gates
    model.backbone.update_routing_buffers()  # the fold: the next forward reads kept weights, no op for them
    assert all(g.mi_weights_current() for g in gates)
    counter = LaunchCount()
    with counter:
        [g.mi_weights() for g in gates]
    assert sum(counter.counts.values()) == 0

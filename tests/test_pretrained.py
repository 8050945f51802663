"""model.init_from: a timm checkpoint of the dense backbone, filtered by timm, then the experts upcycled from it."""

import pytest
import timm
import torch

from mthl_ds.artifacts.export import load_model, save_export
from mthl_ds.build import build_model
from mthl_ds.config import ConfigError, MoEConfig, load_recipe
from mthl_ds.models.backbone import BACKBONES, build_backbone, mlp_blocks


def timm_checkpoint(path, name, img_size, seed, original_layout=False):
    """A checkpoint as timm writes one, of the dense model ``BACKBONES[name]`` with a 10-class classifier, random
    weights from ``seed``. ``original_layout``: wrapped in ``{"model": ...}`` with a non-persistent buffer in it, as
    the Swin authors' files are (timm's filter unwraps it and drops the buffer)."""
    kwargs = dict(BACKBONES[name][0])
    torch.manual_seed(seed)
    if not name.startswith("davit"):
        kwargs["img_size"] = img_size
    net = timm.create_model(kwargs.pop("model_name"), num_classes=10, **kwargs)
    state = net.state_dict()
    if original_layout:
        state = {"model": {**state, "layers.0.blocks.0.attn.relative_position_index": torch.zeros(16, 16).long()}}
    torch.save(state, path)
    return net.state_dict()


@pytest.mark.parametrize("mode, divisor", [("split", None), ("copy", 1)])
def test_dense_weights_load_and_experts_are_upcycled_from_their_rows(tmp_path, mode, divisor):
    source = timm_checkpoint(tmp_path / "swin.pth", "swin_debug", 64, seed=7, original_layout=True)
    moe = MoEConfig(num_experts=4, top_k=2, hidden_divisor=divisor, upcycle=mode)
    backbone = build_backbone("swin_debug", ["a", "b"], moe, img_size=64, seed=0, init_from=str(tmp_path / "swin.pth"))
    loaded = backbone.net.state_dict()
    dense = [k for k in source if not k.startswith("head.fc.") and ".mlp." not in k]
    assert dense and all(torch.equal(loaded[k], source[k]) for k in dense)
    blocks = mlp_blocks(backbone.net)
    assert len(blocks) == len(backbone.moe_layers) == 5
    for i, layer in enumerate(backbone.moe_layers):
        prefix = [name for name, module in backbone.net.named_modules() if module is blocks[i]][0] + ".mlp."
        fc1, fc2 = source[prefix + "fc1.weight"], source[prefix + "fc2.weight"]
        for e in range(layer.num_experts):
            if mode == "copy":
                rows, scale = slice(None), 1.0
            else:
                rows, scale = slice((e % 2) * layer.hidden, (e % 2 + 1) * layer.hidden), 2.0
            w1, b1, w2, b2 = layer.mlps.expert(e)
            assert torch.equal(w1, fc1[rows])
            assert torch.equal(b1, source[prefix + "fc1.bias"][rows])
            assert torch.equal(w2, fc2[:, rows] * scale)
            assert torch.equal(b2, source[prefix + "fc2.bias"])


def test_timms_filter_resamples_a_vit_checkpoint_of_another_size(tmp_path):
    source = timm_checkpoint(tmp_path / "vit.pth", "vit_debug", 224, seed=3)
    backbone = build_backbone("vit_debug", ["a"], None, img_size=64, init_from=str(tmp_path / "vit.pth"))
    loaded = backbone.net.state_dict()
    assert loaded["pos_embed"].shape == (1, 16 + 1, 64) and source["pos_embed"].shape == (1, 196 + 1, 64)
    assert torch.equal(loaded["pos_embed"][:, 0], source["pos_embed"][:, 0])  # the class token's stays
    same = [k for k in source if k not in ("pos_embed", "head.weight", "head.bias")]
    assert all(torch.equal(loaded[k], source[k]) for k in same)


def test_a_checkpoint_of_another_model_is_refused_naming_the_file_and_keys(tmp_path):
    timm_checkpoint(tmp_path / "davit.pth", "davit_debug", 64, seed=0)
    with pytest.raises(ConfigError, match=r"davit\.pth is not a checkpoint of SwinTransformer"
                                          r".*missing: patch_embed.*unexpected: stem\.conv"):
        build_backbone("swin_debug", ["a"], None, img_size=64, init_from=str(tmp_path / "davit.pth"))
    state = timm_checkpoint(tmp_path / "narrow.pth", "swin_debug", 64, seed=0)
    torch.save({k: v[:1] if k == "norm.weight" else v for k, v in state.items()}, tmp_path / "narrow.pth")
    with pytest.raises(ConfigError, match=r"narrow\.pth .*shape \(file vs model\): norm\.weight \(1,\) vs \(256,\)"):
        build_backbone("swin_debug", ["a"], None, img_size=64, init_from=str(tmp_path / "narrow.pth"))
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    with pytest.raises(ConfigError, match=r"notes\.pth is not a torch checkpoint"):
        build_backbone("swin_debug", ["a"], None, img_size=64, init_from=str(tmp_path / "notes.pth"))


def test_recipe_checks_init_from_and_exports_do_not_need_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.init_from: .*nowhere\.pth is not a file"):
        load_recipe("demo", [f"model.init_from={tmp_path / 'nowhere.pth'}"])
    timm_checkpoint(tmp_path / "swin.pth", "swin_debug", 64, seed=1)
    with pytest.raises(ConfigError, match=r"model\.moe\.upcycle"):
        load_recipe("demo", [f"model.init_from={tmp_path / 'swin.pth'}"])
    recipe = load_recipe("demo", [f"model.init_from={tmp_path / 'swin.pth'}", "model.moe.upcycle=split"])
    model = build_model(recipe)
    save_export(tmp_path / "model.safetensors", model, {"tag": "init"}, None)
    (tmp_path / "swin.pth").unlink()  # the export carries the weights; loading it must not read the file
    loaded, _, _ = load_model(tmp_path / "model.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))

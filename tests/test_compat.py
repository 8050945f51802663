"""Files written before the package was reorganised into layers still load: an export written by main at
e6a8d9f (``tests/data/export_main_e6a8d9f.safetensors``: the demo recipe with 16-wide heads, pruned to experts
0, 2, 3, 5 in every MoE layer, coco's K set to 1, random weights) loads, replays its surgery and predicts what it
predicted then. The figures below are that commit's own outputs for the same input."""
from pathlib import Path

import pytest
import torch

from mthl_ds.artifacts.export import load_export, read_metadata

EXPORT = Path(__file__).resolve().parent / "data" / "export_main_e6a8d9f.safetensors"
# main at e6a8d9f: model(torch.randn(1, 3, 64, 64) after torch.manual_seed(0)), imagenet, first four logits
IMAGENET_LOGITS = [-0.43388909101486206, 0.3719445466995239, -0.46308839321136475, -0.03777197748422623]


def test_an_export_written_before_the_layers_loads_and_predicts_as_it_did():
    meta = read_metadata(EXPORT)
    assert [r["op"] for r in meta["surgery"]] == ["keep_experts", "set_top_k"]
    model, _ = load_export(EXPORT)
    layers = model.backbone.moe_layers
    assert [layer.num_experts for layer in layers] == [4] * len(layers) and len(layers) == 5
    assert layers[0].gate.top_k["coco"] == 1
    assert sum(p.numel() for p in model.parameters()) == 1_599_442
    model.eval().set_dataset("imagenet")
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        logits = model(x)[0, :4]
    assert logits.tolist() == pytest.approx(IMAGENET_LOGITS, abs=1e-5)
    for name in ("coco", "ade20k"):  # the other heads run too
        model.set_dataset(name)
        with torch.no_grad():
            model(torch.randn(1, 3, 128, 128))


def test_head_layout_torchvision_builds_the_heads_of_files_written_before_the_openmmlab_heads():
    """``datasets.*.head_layout``: "openmmlab" (a recipe's default) normalises each stage feature the detection
    head takes and builds RetinaNet's P6 from the last stage; "torchvision" builds neither, as the head was before,
    and a stored recipe without the key (the export above, or any written before it) is read as "torchvision"."""
    from mthl_ds.build import build_model
    from mthl_ds.config import load_recipe, recipe_from_dict, recipe_to_dict
    overrides = ["datasets.coco.head_channels=16", "datasets.ade20k.head_channels=16"]
    layouts = {}
    for layout in ("openmmlab", "torchvision"):
        model = build_model(load_recipe("demo", [*overrides, f"datasets.coco.head_layout={layout}"]))
        coco = model.heads["coco"]
        layouts[layout] = (coco.fpn.extra_blocks.p6.weight.shape[1], coco.norms is None)
    last_stage = model.backbone.stage_channels[-1]
    assert layouts == {"openmmlab": (last_stage, False), "torchvision": (16, True)}
    stored = recipe_to_dict(load_recipe("demo", overrides))
    assert {d.head_layout for d in recipe_from_dict(stored, "x").datasets.values()} == {"openmmlab"}
    for d in stored["datasets"].values():
        del d["head_layout"]
    assert {d.head_layout for d in recipe_from_dict(stored, "x").datasets.values()} == {"torchvision"}
    assert {d.head_layout for d in recipe_from_dict(read_metadata(EXPORT)["built_from"], "x").datasets.values()} == {
        "torchvision"}

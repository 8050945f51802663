"""Recipes, overrides, config errors, and the `mthl-ds` command."""
import json
import os
import subprocess
import sys

import pytest

from mthl_ds.config import ConfigError, list_recipes, load_recipe

PAPER_RECIPES = [f"mthl{d}_{b}_{s}" for d in ("", "d") for b in ("swin", "davit") for s in "tsb"]


SINGLE_TASK = {f"single_{d}_swin_t": d for d in ("imagenet", "coco", "ade20k")}


def test_single_task_baselines_hold_one_dataset():
    for name, dataset in SINGLE_TASK.items():
        r = load_recipe(name)
        assert list(r.datasets) == [dataset] and r.model.moe is None
        assert r.datasets[dataset] == load_recipe("mthld_swin_t").datasets[dataset]


COMPANION = {"adamv_vit_s", "adamv_vit_b", "modsquad_vit_s", "demo_adamv", "demo_modsquad"}


def test_recipe_names_and_paper_numbers():
    assert set(list_recipes()) == set(PAPER_RECIPES) | {"demo"} | set(SINGLE_TASK) | COMPANION
    for name in PAPER_RECIPES:
        r = load_recipe(name)
        assert {n: d.sample_weight for n, d in r.datasets.items()} == {"imagenet": 3, "coco": 2, "ade20k": 1}
        assert {n: d.loss_weight for n, d in r.datasets.items()} == {"imagenet": 1.0, "coco": 0.6, "ade20k": 0.2}
        assert {n: d.batch_size for n, d in r.datasets.items()} == {"imagenet": 64, "coco": 2, "ade20k": 2}
        assert (r.train.steps, r.train.lr, r.train.weight_decay, r.train.grad_clip) == (240_000, 0.004, 0.05, 0.1)
        if name.startswith("mthld"):
            assert r.model.moe is None
        else:
            assert (r.model.moe.num_experts, r.model.moe.top_k) == (12, 4)


def test_companion_recipes_carry_their_papers_settings():
    for name in ("adamv_vit_s", "adamv_vit_b"):
        r = load_recipe(name)
        assert (r.model.moe.num_experts, r.model.moe.top_k, r.model.moe.layers) == (8, 1, "every_second")
        assert r.model.moe.losses == {"importance": 0.005, "load": 0.005} and r.model.moe.attention is None
        assert (r.train.aes.holdout, r.train.aes.patience) == (0.01, 2000)
    squad = load_recipe("modsquad_vit_s").model.moe
    assert (squad.num_experts, squad.top_k, squad.attention.num_experts, squad.attention.top_k) == (16, 4, 15, 6)
    assert load_recipe("demo").train.aes is None and load_recipe("demo").model.moe.attention is None


def test_overrides_are_typed():
    r = load_recipe("demo", ["train.lr=0.01", "model.moe.layers=[0, 2]", "datasets.coco.top_k=2"])
    assert r.train.lr == 0.01 and r.model.moe.layers == (0, 2)
    assert r.top_k_per_dataset() == {"imagenet": 4, "coco": 2, "ade20k": 4}


@pytest.mark.parametrize("override,message", [
    (["train.lrr=1"], r"train: unknown key\(s\) \['lrr'\]"),
    (["model.moe.top_k=13"], "model.moe.top_k=13 must be between 1 and num_experts=12"),
    (["datasets.coco.top_k=20"], "datasets.coco.top_k=20"),
    (["train.ep_size=5"], "num_experts=12 is not divisible by train.ep_size=5"),
    (["train.lr=fast"], "train.lr: expected float, got 'fast'"),
    (["datasets.coco.task=depth"], "datasets.coco.task: 'depth' is not one of"),
    (["train.ds_config=missing.json"], "train.ds_config: 'missing.json' is neither a file"),
    (["train.dataset_cycle=[coco, voc]"], r"train.dataset_cycle names \['voc'\], not datasets of the recipe"),
])
def test_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe("demo", override)


def test_zero3_with_moe_is_refused(tmp_path):
    cfg = tmp_path / "z3.json"
    cfg.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    with pytest.raises(ConfigError, match="ZeRO stage 3 cannot be used with MoE"):
        load_recipe("demo", [f"train.ds_config={cfg}"])
    load_recipe("demo", [f"train.ds_config={cfg}", "model.moe=null"])  # dense is fine


def test_unknown_recipe_lists_the_known_ones():
    with pytest.raises(ConfigError, match="recipe 'mthl_vit' not found.*mthl_swin_t"):
        load_recipe("mthl_vit")


def test_model_info_json():
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}  # stdout must stay pure JSON
    out = subprocess.run([sys.executable, "-m", "mthl_ds.cli", "model-info", "demo", "--json"], capture_output=True,
                         text=True, check=True, env=env).stdout
    info = json.loads(out)
    for fig in (info, info["dense"]):
        assert set(fig) >= {"backbone_params", "total_params", "active_params", "flops_per_image", "moe_layers"}
        assert set(fig["active_params"]) == {"imagenet", "coco", "ade20k"}
        assert fig["backbone_params"] < fig["total_params"]
    assert info["moe_layers"] == 5 and info["dense"]["moe_layers"] == 0
    assert info["backbone_params"] > info["dense"]["backbone_params"]
    # the debug model's last stage has 4 tokens per image: min_capacity=4 pads each expert's buffer
    assert info["flops_per_image"]["imagenet"] > info["dense"]["flops_per_image"]["imagenet"]
    # K=2 for one dataset lowers its FLOPs
    low_k = json.loads(subprocess.run([sys.executable, "-m", "mthl_ds.cli", "model-info", "demo", "--json", "--set",
                                       "datasets.coco.top_k=2"], capture_output=True, text=True, check=True).stdout)
    assert low_k["flops_per_image"]["coco"] < low_k["flops_per_image"]["imagenet"]


def test_paper_model_is_flops_matched():
    """Swin-T at 224: experts of hidden / K with capacity K*S/E cost within 3% of the dense twin."""
    from mthl_ds.studies.model_info import model_info
    info = model_info(load_recipe("mthl_swin_t"))
    assert info["moe_layers"] == 12
    assert abs(info["flops_per_image"]["imagenet"] / info["dense"]["flops_per_image"]["imagenet"] - 1) < 0.03
    assert info["dense"]["backbone_params"] == 27_519_354  # timm's swin_tiny without its classifier


def test_cli_config_error_exit_code():
    proc = subprocess.run([sys.executable, "-m", "mthl_ds.cli", "model-info", "demo", "--set", "train.bogus=1"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown key(s) ['bogus']" in proc.stderr


def test_train_is_a_verb_that_hands_its_arguments_to_the_trainer(tmp_path):
    """``mthl-ds train`` (and ``python -m mthl_ds train``, what the deepspeed launcher's ``--module mthl_ds`` runs,
    with its ``--local_rank``) parses the trainer's own arguments; other verbs still refuse unknown ones."""
    help_ = subprocess.run([sys.executable, "-m", "mthl_ds", "--local_rank=0", "train", "--help"],
                           capture_output=True, text=True)
    assert help_.returncode == 0 and "usage: mthl-ds train" in help_.stdout and "--recipe" in help_.stdout
    bad = subprocess.run([sys.executable, "-m", "mthl_ds", "train", "--recipe", "demo", "--out", str(tmp_path / "r"),
                          "--set", "train.bogus=1"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown key(s) ['bogus']" in bad.stderr and not (tmp_path / "r").exists()
    other = subprocess.run([sys.executable, "-m", "mthl_ds", "recipes", "--recipe", "demo"], capture_output=True,
                           text=True)
    assert other.returncode == 2 and "unrecognized arguments: --recipe demo" in other.stderr

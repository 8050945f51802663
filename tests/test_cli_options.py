"""`mthl-ds` flags no other test used, each checked by what it changes: `recipes`, `model-info --set name=... /
--memory --gpus --gpu-memory`, `synth`, every `shards` option, `predict --batch-size --precision --draw-threshold`,
`stats --size --batch-size --grad-params`, the `adapt` verb, `expand --size --head-channels --seed`,
`bench --only / data --real-size --recipe`, and `demo --recipe`. Everything runs in this process on the test
shards, their raw world (``shards.parent / "raw"``) or an untrained demo export."""
import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from mthl_ds.artifacts.export import load_export, read_metadata, save_export
from mthl_ds.build import build_model
from mthl_ds.cli import main
from mthl_ds.config import RECIPE_DIR, list_recipes, load_recipe
from mthl_ds.data.reader import ShardSet, read_shard
from mthl_ds.models.backbone import MoEBackbone
from mthl_ds.models.mthl import MTHLModel
from mthl_ds.runtime.engine import launcher_free_env


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """An untrained demo model, exported."""
    return save_export(tmp_path_factory.mktemp("cli_source") / "demo.safetensors", build_model(load_recipe("demo")),
                       {"note": "fresh demo model"})


class Forwards:
    """Counts the forwards of every module of a class, in any model this process builds (torch's global hook)."""

    def __init__(self, cls):
        self.cls, self.count = cls, 0

    def __enter__(self):
        def hook(module, args, output):
            if type(module) is self.cls:
                self.count += 1
        self.handle = torch.nn.modules.module.register_module_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def samples_of(folder):
    s = ShardSet.open(folder)
    return s, [sample for shard in s.shards for sample in read_shard(s.root / shard["name"])[0]]


# ------------------------------------------------------------------------------------- recipes and model-info

def test_recipes_lists_each_recipe_with_its_description(capsys):
    assert main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = list_recipes()
    descriptions = {n: yaml.safe_load((RECIPE_DIR / f"{n}.yaml").read_text())["description"] for n in names}
    assert all(descriptions.values())
    assert lines == [f"{n:<16} {descriptions[n]}" for n in names]
    assert load_recipe("demo").description == descriptions["demo"]


def test_model_info_name_override_and_memory_plan_flags(capsys):
    assert main(["model-info", "demo", "--set", "name=tiny_demo"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "recipe tiny_demo"
    assert main(["model-info", "demo", "--memory", "--gpus", "4", "--gpu-memory", "1,2", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["gpus"] == 4 and [p["ep_size"] for p in plan["plans"]] == [1, 2, 4]  # divisors of 12 and of 4
    assert all(set(p["fits"]) == {"1", "2"} for p in plan["plans"])


# ------------------------------------------------------------------------------------------- synth and shards

def test_synth_writes_the_world_of_its_seed_and_scale(tmp_path, capsys):
    from mthl_ds.studies.synth import write_world
    assert main(["synth", "--out", str(tmp_path / "a"), "--seed", "2", "--scale", "0.05"]) == 0
    assert "coco" in capsys.readouterr().out
    write_world(tmp_path / "same", seed=2, scale=0.05)
    write_world(tmp_path / "other_seed", seed=3, scale=0.05)
    write_world(tmp_path / "larger", seed=2, scale=0.1)

    def files(root):
        return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    a = files(tmp_path / "a")
    assert a == files(tmp_path / "same")  # the seed and the scale given
    other = files(tmp_path / "other_seed")
    assert set(other) == set(a) and any(other[k] != a[k] for k in a)
    coco = lambda root: len(list((root / "coco" / "train2017").iterdir()))  # noqa: E731
    assert coco(tmp_path / "larger") == 2 * coco(tmp_path / "a") > 0


def test_shards_verb_passes_each_option_to_its_converter(shards, tmp_path, capsys):
    raw = shards.parent / "raw"
    # imagenet's flat val layout with another label file: every image labelled with the first class
    solution = (raw / "imagenet" / "LOC_val_solution.csv").read_text().splitlines()
    first = sorted(p.name for p in (raw / "imagenet" / "train").iterdir())[0]
    labels = tmp_path / "labels.csv"
    labels.write_text("\n".join([solution[0]] + [f"{r.split(',')[0]},{first} 0 0 9 9" for r in solution[1:]]) + "\n")
    args = ["shards", "imagenet", "--root", str(raw / "imagenet"), "--split", "val", "--labels", str(labels),
            "--name", "inet", "--shard-size", "16", "--workers", "2", "--out", str(tmp_path / "inet")]
    assert main(args) == 0
    index, samples = samples_of(tmp_path / "inet")
    assert (index.index["dataset"], index.index["split"], len(index.shards)) == ("inet", "val", 5)  # 80 / 16
    assert len(samples) == 80 and {int(m["cls"]) for _, m in samples} == {0}
    assert main(args) == 2 and "pass --force" in capsys.readouterr().err
    assert main([*args[:-6], "--shard-size", "40", "--workers", "1", "--out", str(tmp_path / "inet"), "--force"]) == 0
    assert len(ShardSet.open(tmp_path / "inet").shards) == 2
    # coco: images and annotations
    assert main(["shards", "coco", "--images", str(raw / "coco" / "val2017"), "--annotations",
                 str(raw / "coco" / "annotations" / "instances_val2017.json"), "--split", "val",
                 "--out", str(tmp_path / "coco")]) == 0
    coco = ShardSet.open(tmp_path / "coco")
    assert coco.task == "detection" and len(coco) == len(list((raw / "coco" / "val2017").iterdir()))
    # ade20k: another class count than its objectInfo150.csv names (4 here)
    ade = raw / "ADEChallengeData2016"
    assert main(["shards", "ade20k", "--root", str(ade), "--split", "validation", "--num-classes", "6",
                 "--out", str(tmp_path / "ade")]) == 0
    assert ShardSet.open(tmp_path / "ade").index["num_classes"] == 6
    # masks: class names from a file, stored values mapped, everything else the given ignore index
    (tmp_path / "names.txt").write_text("sky\ngrass\n")
    (tmp_path / "map.json").write_text(json.dumps({"1": 0, "2": 1}))
    common = ["shards", "masks", "--images", str(ade / "images" / "validation"), "--masks",
              str(ade / "annotations" / "validation"), "--split", "val"]
    assert main([*common, "--classes", str(tmp_path / "names.txt"), "--ignore-index", "250", "--label-map",
                 str(tmp_path / "map.json"), "--out", str(tmp_path / "masks")]) == 0
    index, samples = samples_of(tmp_path / "masks")
    assert index.index["classes"] == ["sky", "grass"] and index.index["ignore_index"] == 250
    masks = [np.asarray(Image.open(io.BytesIO(m["png"]))) for _, m in samples]
    values = set(np.unique(np.concatenate([np.unique(m) for m in masks])))
    assert values == {0, 1, 250}
    assert main([*common, "--num-classes", "5", "--out", str(tmp_path / "masks5")]) == 0
    assert ShardSet.open(tmp_path / "masks5").index["num_classes"] == 5
    # voc: the year's folder and the AP method (VOC2007's default is 11-point)
    voc = ["shards", "voc", "--root", str(raw / "voc"), "--split", "test"]
    assert main([*voc, "--year", "2007", "--ap", "area", "--out", str(tmp_path / "voc")]) == 0
    assert ShardSet.open(tmp_path / "voc").index["voc_ap"] == "area"
    assert main([*voc, "--year", "2012", "--out", str(tmp_path / "voc12")]) == 2
    assert "VOC2012" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ predict and stats

def write_images(folder, count=3):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        paths.append(folder / f"img{i}.png")
        Image.fromarray(rng.integers(0, 255, size=(96 + 16 * i, 128, 3), dtype=np.uint8)).save(paths[-1])
    return paths


def test_predict_batch_size_precision_and_draw_threshold(tmp_path):
    model = build_model(load_recipe("demo"))
    with torch.no_grad():  # every anchor scores sigmoid(3) = 0.95: 100 boxes per image, whatever the input
        model.heads["coco"].head.classification_head.cls_logits.bias.fill_(3.0)
    export = save_export(tmp_path / "m.safetensors", model, {})
    images = [str(p) for p in write_images(tmp_path / "images")]
    runs = {}
    for name, extra in (("default", []), ("batch2", ["--batch-size", "2"]), ("bf16", ["--precision", "bf16"])):
        with Forwards(MTHLModel) as forwards:
            assert main(["predict", str(export), *images, "--dataset", "imagenet", "--out", str(tmp_path / name),
                         *extra]) == 0
        runs[name] = (forwards.count, json.loads((tmp_path / name / "predictions.json").read_text()))
    assert runs["default"][0] == 1 and runs["batch2"][0] == 2  # 3 images: 8 per forward by default, then 2 + 1
    scores = {n: np.array([[c["score"] for c in r["top5"]] for r in records]) for n, (_, records) in runs.items()}
    np.testing.assert_allclose(scores["batch2"], scores["default"], atol=1e-5)
    assert not np.array_equal(scores["bf16"], scores["default"])  # bf16 autocast rounds the logits
    np.testing.assert_allclose(scores["bf16"], scores["default"], atol=0.05)
    assert main(["predict", str(export), images[0], "--dataset", "imagenet", "--precision", "fp16",
                 "--out", str(tmp_path / "fp16")]) == 2  # fp16 is refused on the CPU
    drawn = {}
    for threshold in ("0.5", "0.99"):
        out = tmp_path / f"coco_{threshold}"
        assert main(["predict", str(export), images[0], "--dataset", "coco", "--draw-threshold", threshold,
                     "--out", str(out)]) == 0
        records = json.loads((out / "predictions.json").read_text())
        assert len(records[0]["scores"]) == 100 and 0.9 < min(records[0]["scores"]) < 0.99
        drawn[threshold] = np.asarray(Image.open(out / "img0.png.boxes.jpg"))
    plain = io.BytesIO()
    Image.open(images[0]).convert("RGB").save(plain, format="JPEG")
    assert np.array_equal(drawn["0.99"], np.asarray(Image.open(plain)))  # no box scores 0.99: nothing drawn
    assert not np.array_equal(drawn["0.5"], drawn["0.99"])


def test_stats_size_batch_size_and_grad_params(shards, source, tmp_path):
    data = ["--data", f"imagenet={shards / 'imagenet'}", "--data", f"ade20k={shards / 'ade20k'}", "--split", "val"]
    with Forwards(MoEBackbone) as forwards:
        assert main(["stats", str(source), *data, "--max-images", "5", "--size", "96", "96", "--batch-size", "2",
                     "--out", str(tmp_path / "stats")]) == 0
    assert forwards.count == 2 * 3 * 3  # per dataset 5 images in batches of 2, each batch through the 3 routers
    usage = json.loads((tmp_path / "stats" / "routing_stats.json").read_text())
    assert usage["images"] == {"imagenet": 5, "ade20k": 5}
    assert sum(usage["layers"][0]["usage"]["imagenet"]) == 5 * (96 // 4) ** 2 * 4  # every token of 96 x 96, K = 4
    pattern = r"^net\.patch_embed\.proj\.weight$"
    assert main(["stats", str(source), *data, "--max-images", "4", "--grad-cosine", "imagenet,ade20k",
                 "--grad-batches", "1", "--grad-params", pattern, "--out", str(tmp_path / "cosine")]) == 0
    cosine = json.loads((tmp_path / "cosine" / "grad_cosine.json").read_text())
    patch = load_export(source)[0].backbone.net.patch_embed.proj.weight
    assert cosine["tensors"] == 1 and cosine["parameters"] == patch.numel()
    assert list(cosine["batches"][0]["per_tensor"]) == ["net.patch_embed.proj.weight"]


# ---------------------------------------------------------------------------------------------- adapt, expand

def test_adapt_verb_runs_one_mode_with_its_settings(shards, source, tmp_path, capsys):
    out = tmp_path / "adapt"
    assert main(["adapt", str(source), "--data", str(shards / "pets"), "--dataset", "mypets", "--mode", "routers_1ex",
                 "--out", str(out), "--steps", "2", "--lr", "0.02", "--batch-size", "4", "--size", "96", "96",
                 "--head-channels", "16", "--workers", "0", "--seed", "1"]) == 0
    printed = capsys.readouterr().out
    row = json.loads((out / "result.json").read_text())
    assert json.loads(printed[printed.rindex("{"):]) == row
    assert (row["mode"], row["dataset"], row["phases"]) == ("routers_1ex", "mypets", 1)
    recipe = yaml.safe_load((out / "phase1" / "recipe.yaml").read_text())
    assert recipe["adapt"]["tune_experts"] == 1 and list(recipe["datasets"]) == ["mypets"]
    d = recipe["datasets"]["mypets"]
    assert (d["batch_size"], d["size"], d["head_channels"], d["shards"]) == (4, [96, 96], 16,
                                                                              str((shards / "pets").resolve()))
    assert {k: recipe["train"][k] for k in ("steps", "lr", "workers", "seed")} == {"steps": 2, "lr": 0.02,
                                                                                    "workers": 0, "seed": 1}
    assert row["export"] == str(out / "phase1" / "model.safetensors")
    model, meta = load_export(out / "phase1" / "model.safetensors")
    assert meta["model"]["heads"] == ["mypets"]
    before = load_export(source)[0].state_dict()
    after = model.state_dict()
    moved = {k.split(".deepspeed_experts.")[0] + "/" + k.split(".deepspeed_experts.")[1].split(".")[0]
             for k in after if ".deepspeed_experts." in k and not torch.equal(after[k], before[k])}
    assert len(moved) == 5 and len({m.split("/")[0] for m in moved}) == 5  # one expert in each MoE layer


def test_expand_size_head_channels_and_seed(shards, source, tmp_path):
    """On the segmentation set (streets): the UperNet head is --head-channels wide, the input --size (the export's
    segmentation size is 64), and the new experts are initialised from --seed."""
    out = tmp_path / "expand"
    assert main(["expand", str(source), "--add-experts", "2", "--dataset", "streets", "--data", str(shards / "streets"),
                 "--out", str(out), "--steps", "1", "--batch-size", "2", "--workers", "0", "--size", "96", "96",
                 "--head-channels", "16", "--seed", "4"]) == 0
    meta = read_metadata(out / "model.safetensors")
    assert {"op": "add_experts", "count": 2, "seed": 4} in meta["surgery"]
    assert meta["datasets"]["streets"]["size"] == [96, 96]
    model, _ = load_export(out / "model.safetensors")
    assert model.heads["streets"].classifier.in_channels == 16
    assert yaml.safe_load((out / "recipe.yaml").read_text())["train"]["seed"] == 4


# ------------------------------------------------------------------------------------------------ bench, demo

def test_bench_only_and_real_size_data_of_a_recipe(tmp_path, capsys):
    """In this process, so with ``--system-malloc``: the test runner keeps the C library's defaults."""
    assert main(["bench", "--smoke", "--only", "B1", "--repeats", "1", "--system-malloc",
                 "--out", str(tmp_path / "suite")]) == 0
    rows = json.loads((tmp_path / "suite" / "bench_all.json").read_text())
    assert {r["id"] for r in rows} == {"peak", "B1", "B2"}  # B1 and B2 are timed together
    assert main(["bench", "data", "--real-size", "--recipe", "demo", "--count", "4", "--repeats", "1",
                 "--system-malloc", "--out", str(tmp_path / "data")]) == 0
    rows = json.loads((tmp_path / "data" / "bench_data.json").read_text())
    assert [r["benchmark"] for r in rows] == ["imagenet pipeline at [64, 64]", "coco pipeline at [128, 128]",
                                              "ade20k pipeline at [64, 64]"]  # the demo's sizes, not Swin-T's
    assert [r["batch"] for r in rows] == [32, 8, 4]


def test_demo_recipe_flag_is_read_before_any_work(tmp_path):
    """Refused before the world is written (were the flag ignored, a whole demo would start: the timeout ends it)."""
    proc = subprocess.run([sys.executable, "-m", "mthl_ds.cli", "demo", "--recipe", "demo_nonesuch", "--out",
                           str(tmp_path / "demo")], capture_output=True, text=True, timeout=120,
                          env=launcher_free_env())
    assert proc.returncode == 2 and "recipe 'demo_nonesuch' not found" in proc.stderr
    assert not (tmp_path / "demo" / "shards").exists()

"""Batch-independent inference, `mthl-ds evaluate` and `mthl-ds predict` / `mthl_ds.load` on exported models."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import demo_overrides
from mthl_ds.bench.inference import flat_outputs
from mthl_ds.config import load_recipe
from mthl_ds.engine import launcher_free_env
from mthl_ds.models.mthl import build_model


@pytest.mark.parametrize("eval_drop_tokens", [False, True])
def test_an_image_gives_the_same_output_alone_and_in_any_batch(eval_drop_tokens):
    """Eval keeps every route (default): an image's logits, box outputs and segmentation logits equal those it
    gets alone, within 1e-5 of the largest output, inside batches of other sizes and contents. With the old
    behaviour (``eval_drop_tokens``) the rest of the batch changes them."""
    model = build_model(load_recipe("demo", [f"model.moe.eval_drop_tokens={str(eval_drop_tokens).lower()}"])).eval()
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    with torch.no_grad():
        for name, size in (("imagenet", 64), ("coco", 128), ("ade20k", 64)):
            x = torch.randn(9, 3, size, size, generator=gen)
            model.set_dataset(name)
            alone = flat_outputs(model(x[:1]))
            scale = float(alone.abs().max())
            for batch, row in ((x[[5, 0, 2, 3]], 1), (x.flip(0), 8), (torch.cat([x[:1], x[:1] * 0]), 0)):
                worst = max(worst, float((flat_outputs(model(batch))[row] - alone[0]).abs().max()) / scale)
    if eval_drop_tokens:
        assert worst > 1e-3, worst
    else:
        assert worst < 1e-5, worst


@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory):
    """A 2-step one-rank demo run (its own evaluation at the recipe's eval batches) and its export."""
    out = tmp_path_factory.mktemp("predict")
    args = [a for o in demo_overrides(shards, steps=2, ckpt_every=2, ep_size=1) for a in ("--set", o)]
    proc = subprocess.run([sys.executable, "-m", "mthl_ds.train", "--recipe", "demo", "--out", str(out / "run"), *args],
                          capture_output=True, text=True, env=launcher_free_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cli(["export", str(out / "run"), "--out", str(out / "model.safetensors")])
    return out


def cli(args, expect=0):
    proc = subprocess.run([sys.executable, "-m", "mthl_ds.cli", *args], capture_output=True, text=True,
                          env=launcher_free_env(), timeout=600)
    assert proc.returncode == expect, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def test_evaluate_gives_the_trainers_metrics_at_any_batch_and_scores_the_original_annotations(shards, trained):
    data = [a for n in ("imagenet", "coco", "ade20k") for a in ("--data", f"{n}={shards / n}")]
    cli(["evaluate", str(trained / "model.safetensors"), *data, "--batch-size", "1", "--out", str(trained / "ev")])
    ours = json.loads((trained / "ev" / "eval_metrics.json").read_text())
    theirs = json.loads((trained / "run" / "eval_metrics.json").read_text())
    for name in theirs:
        for key, value in theirs[name]["all"].items():
            tolerance = 1e-2 if key.startswith("AP") or key == "mAP" else 1e-6  # see test_evaluation
            assert ours["results"][name]["all"][key] == pytest.approx(value, abs=tolerance), (name, key)
    assert "the trainer's" in (trained / "ev" / "report.md").read_text()
    raw = shards.parent / "raw" / "coco" / "annotations" / "instances_val2017.json"
    proc = cli(["evaluate", str(trained / "run"), "--data", f"coco={shards / 'coco'}", "--data",
                f"ade20k={shards / 'ade20k'}", "--annotations", f"coco={raw}", "--original", "--out",
                str(trained / "ev2")])
    second = json.loads((trained / "ev2" / "eval_metrics.json").read_text())
    assert str(raw) in second["protocol"]["coco"] and "original resolution" in second["protocol"]["ade20k"]
    assert second["results"]["ade20k"]["all"]["pixels"] > ours["results"]["ade20k"]["all"]["pixels"]  # full size
    assert "mAP" in proc.stdout
    bad = cli(["evaluate", str(trained / "model.safetensors"), "--data", f"pets={shards / 'pets'}"], expect=2)
    assert "the model has no dataset 'pets'" in bad.stderr


def write_images(folder):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate([(96, 128), (160, 120)]):
        path = folder / f"img{i}.png" if i else folder / f"img{i}.jpg"
        Image.fromarray(rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_predict_api_and_command_for_every_head(trained, tmp_path):
    import mthl_ds
    images = write_images(tmp_path / "images")
    model = mthl_ds.load(trained / "model.safetensors")
    top = model.predict(images, dataset="imagenet")
    assert len(top) == 2 and len(top[0]["top5"]) == 5
    assert top[0]["top5"][0]["name"] != f"class_{top[0]['top5'][0]['label']}"  # the shards' class names
    apart = model.predict(images[:1], dataset="imagenet") + model.predict(images[1:], dataset="imagenet")
    for together, alone in zip(top, apart):  # the same image alone or with another: the same top-5 (1e-5)
        assert [c["label"] for c in together["top5"]] == [c["label"] for c in alone["top5"]]
        assert [c["score"] for c in together["top5"]] == pytest.approx([c["score"] for c in alone["top5"]], abs=1e-5)
    masks = model.predict([np.asarray(Image.open(p).convert("RGB")) for p in images], dataset="ade20k")
    assert [m["mask"].shape for m in masks] == [(128, 96), (120, 160)]  # the original sizes
    for name, files in (("imagenet", []), ("coco", ["img0_boxes.jpg", "detections.json"]),
                        ("ade20k", ["img0_mask.png", "img1_overlay.jpg"])):
        out = tmp_path / name
        proc = cli(["predict", str(trained / "model.safetensors"), *map(str, images), "--dataset", name, "--out",
                    str(out)])
        assert "images/s" in proc.stdout
        records = json.loads((out / "predictions.json").read_text())
        assert [r["file"] for r in records] == list(map(str, images))
        for f in files:
            assert (out / f).is_file(), f
    mask = np.asarray(Image.open(tmp_path / "ade20k" / "img1_mask.png"))
    assert mask.shape == (120, 160) and mask.max() < 4
    detections = json.loads((tmp_path / "coco" / "detections.json").read_text())
    assert all(set(d) == {"image_id", "category_id", "bbox", "score"} for d in detections)
    assert all(d["category_id"] in (1, 3, 7) for d in detections)  # the synthetic COCO's sparse ids
    (tmp_path / "notes.jpg").write_text("not an image")
    bad = cli(["predict", str(trained / "model.safetensors"), str(tmp_path / "notes.jpg"), "--dataset", "coco",
               "--out", str(tmp_path / "bad")], expect=2)
    assert "notes.jpg: not an image" in bad.stderr and not (tmp_path / "bad").exists()
    bad = cli(["predict", str(trained / "model.safetensors"), str(images[0]), "--dataset", "voc", "--out",
               str(tmp_path / "bad")], expect=2)
    assert "unknown dataset 'voc'" in bad.stderr

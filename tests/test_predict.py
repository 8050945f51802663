"""Batch-independent inference, `mthl-ds evaluate` and `mthl-ds predict` / `mthl_ds.load` on exported models."""
import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import demo_overrides
from PIL import Image
from workers.eval_ranks import prepare

from mthl_ds.artifacts.export import save_export
from mthl_ds.build import build_model
from mthl_ds.config import load_recipe
from mthl_ds.errors import InputError
from mthl_ds.runtime.engine import launcher_free_env
from mthl_ds.studies.bench.inference import flat_outputs


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
    cli(["evaluate", str(trained / "model.safetensors"), *data, "--batch-size", "1", "--device", "cpu", "--out",
         str(trained / "ev")])
    ours = json.loads((trained / "ev" / "eval_metrics.json").read_text())
    assert ours["device"] == "cpu"
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
    for name, files in (("imagenet", []), ("coco", ["img0.jpg.boxes.jpg", "detections.json"]),
                        ("ade20k", ["img0.jpg.mask.png", "img1.png.overlay.jpg"])):
        out = tmp_path / name
        proc = cli(["predict", str(trained / "model.safetensors"), *map(str, images), "--dataset", name, "--out",
                    str(out), "--device", "cpu"])
        assert "images/s" in proc.stdout
        records = json.loads((out / "predictions.json").read_text())
        assert [r["file"] for r in records] == list(map(str, images))
        if name == "imagenet":  # --device cpu: the API's results (another process: another thread count, so the
            # float sums may round differently in the last bits)
            assert [[c["label"] for c in r["top5"]] for r in records] == [[c["label"] for c in t["top5"]] for t in top]
            assert [c["score"] for r in records for c in r["top5"]] == pytest.approx(
                [c["score"] for t in top for c in t["top5"]], abs=1e-6)
        for f in files:
            assert (out / f).is_file(), f
    mask = np.asarray(Image.open(tmp_path / "ade20k" / "img1.png.mask.png"))
    assert mask.shape == (120, 160) and mask.max() < 4
    detections = json.loads((tmp_path / "coco" / "detections.json").read_text())
    assert all(set(d) == {"image_id", "category_id", "bbox", "score"} for d in detections)
    assert all(d["category_id"] in (1, 3, 7) for d in detections)  # the synthetic COCO's sparse ids
    bad = cli(["predict", str(trained / "model.safetensors"), str(images[0]), "--dataset", "voc", "--out",
               str(tmp_path / "bad")], expect=2)
    assert "unknown dataset 'voc'" in bad.stderr


# ------------------------------------------------------------------------------------ devices and precision

@pytest.fixture(scope="module")
def random_export(tmp_path_factory):
    """An untrained demo model, exported (no training): its detector keeps every box and has spread class weights
    (``eval_ranks.prepare``; the spread weights travel in the file, the score threshold is set after loading)."""
    path = tmp_path_factory.mktemp("random") / "model.safetensors"
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = prepare(build_model(load_recipe("demo")))
    save_export(path, model, {"tag": "random"}, None)
    return path


def test_load_on_the_cpu_bf16_close_to_fp32_and_fp16_refused_there(random_export, tmp_path):
    """``mthl_ds.load(path, device="cpu")`` puts the model on the CPU. bf16 autocast on the CPU runs every head and
    stays close to fp32: the top-5 probabilities position by position within 0.005 (measured: 7e-4 at most, on
    probabilities of about 0.05; bf16 keeps 8 significant bits, 0.4% per rounding), segmentation masks on at least
    98% of the pixels (measured: 99.4%; an untrained decoder's labels hold near-ties, 0.6-1.3% of them flipped
    over the random draws tried). An untrained detector's scores sit within 1e-4 of the prior, finer than
    bf16 resolves (its logits near -4.6 are 0.03 apart), so which boxes survive is arbitrary there: the sorted
    scores agree within 1e-3, and the boxes lie in the image. fp16 on the CPU is refused, at load and per call."""
    import mthl_ds
    images = write_images(tmp_path / "images")
    model = mthl_ds.load(random_export, device="cpu")
    assert model.device == torch.device("cpu") and {p.device.type for p in model.model.parameters()} == {"cpu"}
    model.model.heads["coco"].score_thresh = 0.0
    top, top_bf16 = (model.predict(images, "imagenet", precision=p) for p in ("fp32", "bf16"))
    for a, b in zip(top, top_bf16):
        assert [c["score"] for c in b["top5"]] == pytest.approx([c["score"] for c in a["top5"]], abs=5e-3)
    for a, b in zip(*(model.predict(images, "ade20k", precision=p) for p in (None, "bf16"))):
        assert a["mask"].shape == b["mask"].shape and (a["mask"] == b["mask"]).mean() >= 0.98
    for a, b, path in zip(*(model.predict(images, "coco", precision=p) for p in (None, "bf16")), images):
        assert len(a["scores"]) == len(b["scores"]) > 0
        assert sorted(b["scores"]) == pytest.approx(sorted(a["scores"]), abs=1e-3)
        width, height = Image.open(path).size
        boxes = np.asarray(b["boxes"])  # x, y, w, h
        assert (boxes >= 0).all() and (boxes[:, 0] + boxes[:, 2] <= width + 1e-3).all()
        assert (boxes[:, 1] + boxes[:, 3] <= height + 1e-3).all()
    assert mthl_ds.load(random_export, device="cpu", precision="bf16").predict(images, "imagenet") == top_bf16
    with pytest.raises(InputError, match="fp16 on the CPU is refused"):
        mthl_ds.load(random_export, device="cpu", precision="fp16")
    with pytest.raises(InputError, match="fp16 on the CPU is refused"):
        model.predict(images, "imagenet", precision="fp16")
    with pytest.raises(InputError, match="'fp8'"):
        model.predict(images, "imagenet", precision="fp8")


def test_a_device_the_machine_lacks_is_refused_before_any_work(random_export, shards, tmp_path, capsys):
    """``--device`` of evaluate, predict and stats: a name that is no device, a GPU index past the last, and (where
    there is no CUDA) ``cuda`` itself exit with 2 and a message naming the device and CUDA, before anything is
    written; ``--device cpu`` runs."""
    from mthl_ds.cli import main
    image = write_images(tmp_path / "images")[0]
    commands = {"evaluate": ["evaluate", str(random_export), "--data", f"imagenet={shards / 'imagenet'}"],
                "predict": ["predict", str(random_export), str(image), "--dataset", "imagenet"],
                "stats": ["stats", str(random_export), "--data", f"imagenet={shards / 'imagenet'}",
                          "--max-images", "4"]}
    bad = ["tpu", "cuda:99"] + ([] if torch.cuda.is_available() else ["cuda"])
    for command, args in commands.items():
        for device in bad:
            assert main([*args, "--out", str(tmp_path / command), "--device", device]) == 2, (command, device)
            err = capsys.readouterr().err
            assert f"--device {device!r}" in err and "cuda" in err.lower(), err
            if device == "cuda":
                assert "CUDA is not available on this machine" in err
        assert not (tmp_path / command).exists(), command
        assert main([*args, "--out", str(tmp_path / command), "--device", "cpu"]) == 0, command
    assert json.loads((tmp_path / "evaluate" / "eval_metrics.json").read_text())["device"] == "cpu"
    assert json.loads((tmp_path / "stats" / "routing_stats.json").read_text())["images"] == {"imagenet": 4}


# ------------------------------------------------------------------------------------------ real-world files

def awkward_folder(folder):
    """What a user's folder holds: a photo and a PNG of the same name in a subfolder, a phone photo stored
    sideways (400x600 ... here 40x60, EXIF orientation 6: shown 60x40), a 16-bit PNG, a CMYK JPEG, and a
    truncated JPEG."""
    rng = np.random.default_rng(3)
    (folder / "dup").mkdir(parents=True)
    picture = Image.fromarray(rng.integers(0, 255, size=(48, 64, 3), dtype=np.uint8))
    picture.save(folder / "chelsea.jpg")
    picture.resize((40, 30)).save(folder / "dup" / "chelsea.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rng.integers(0, 255, size=(60, 40, 3), dtype=np.uint8)).save(folder / "phone.jpg", exif=exif)
    Image.fromarray(rng.integers(0, 65535, size=(36, 52), dtype=np.uint16)).save(folder / "deep.png")
    picture.convert("CMYK").save(folder / "print.jpg")
    whole = io.BytesIO()
    picture.resize((300, 300)).save(whole, format="JPEG")
    (folder / "cut.jpg").write_bytes(whole.getvalue()[:2000])
    return [folder / n for n in ("chelsea.jpg", "dup/chelsea.png", "phone.jpg", "deep.png", "print.jpg", "cut.jpg")]


def test_predict_on_a_folder_with_a_bad_file_keeps_going(random_export, tmp_path, capsys):
    """The command gives every readable image its result, named after its path (no two outputs collide), in the
    displayed frame (the phone photo's mask is 40 high and 60 wide, its drawing 60x40); the truncated file
    gets an error record, is named on stderr, and the exit code is 1."""
    from mthl_ds.cli import main
    images = awkward_folder(tmp_path / "photos")
    sizes = {"chelsea.jpg": (64, 48), "dup/chelsea.png": (40, 30), "phone.jpg": (60, 40), "deep.png": (52, 36),
             "print.jpg": (64, 48)}
    for dataset in ("ade20k", "coco"):
        out = tmp_path / dataset
        assert main(["predict", str(random_export), *map(str, images), "--dataset", dataset, "--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert f"{images[-1]}: does not decode as an image (image file is truncated" in err
        assert "1 of 6 images could not be read" in err
        records = json.loads((out / "predictions.json").read_text())
        assert [r["file"] for r in records] == list(map(str, images))
        assert set(records[-1]) == {"image_id", "file", "error"} and "truncated" in records[-1]["error"]
        for record, (name, (width, height)) in zip(records, sizes.items()):
            if dataset == "ade20k":
                assert record["mask"] == f"{name}.mask.png" and record["size"] == [width, height]
                assert np.asarray(Image.open(out / record["mask"])).shape == (height, width), name
                assert (out / f"{name}.overlay.jpg").is_file()
            else:
                assert record["drawing"] == f"{name}.boxes.jpg" and Image.open(out / record["drawing"]).size == (
                    width, height)
                boxes = np.asarray(record["boxes"]).reshape(-1, 4)
                assert (boxes[:, 0] + boxes[:, 2] <= width + 1e-3).all()
                assert (boxes[:, 1] + boxes[:, 3] <= height + 1e-3).all(), name
        if dataset == "coco":  # COCO results: none for the unreadable image (id 6)
            assert {r["image_id"] for r in json.loads((out / "detections.json").read_text())} <= set(range(1, 6))


def test_the_api_raises_on_a_bad_file_or_skips_it(random_export, tmp_path):
    import mthl_ds
    images = awkward_folder(tmp_path / "photos")
    model = mthl_ds.load(random_export, device="cpu")
    with pytest.raises(InputError, match="cut.jpg: does not decode as an image"):
        model.predict(images, "ade20k")
    with pytest.raises(InputError, match="gone.jpg: file not found"):
        model.predict([tmp_path / "gone.jpg"], "ade20k")
    skipped = model.predict(images, "ade20k", errors="skip")
    assert set(skipped[-1]) == {"file", "error"} and skipped[-1]["file"] == str(images[-1])
    assert "truncated" in skipped[-1]["error"]
    for a, b in zip(skipped[:-1], model.predict(images[:-1], "ade20k")):
        assert np.array_equal(a["mask"], b["mask"])
    assert skipped[2]["mask"].shape == (40, 60)  # the phone photo, upright
    model.model.heads["coco"].score_thresh = 0.0  # an untrained detector: keep every box
    boxes = np.asarray(model.predict(images[2:3], "coco")[0]["boxes"])  # x, y, w, h in the upright 60x40 frame
    assert len(boxes) and (boxes[:, 0] + boxes[:, 2] <= 60 + 1e-3).all()
    assert (boxes[:, 1] + boxes[:, 3] <= 40 + 1e-3).all()
    assert (boxes[:, 0] + boxes[:, 2] > 41).any()  # past the stored width: not the sideways frame
    with pytest.raises(InputError, match="errors='ignore'"):
        model.predict(images, "ade20k", errors="ignore")

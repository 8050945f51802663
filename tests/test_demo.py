"""The README's main command, `mthl-ds demo`, in a short form: synthetic world -> shards -> 2 ranks under
the deepspeed launcher (ZeRO 2, LAMB, expert parallelism 2) -> evaluation -> report."""
import json
import subprocess
import sys

STEPS = 500


def test_short_demo_learns_all_three_tasks(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mthl_ds.cli", "demo", "--out", str(tmp_path), "--set",
                           f"train.steps={STEPS}"], capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    final = json.loads((tmp_path / "final_metrics.json").read_text())
    assert {n: (m["task"], m["metric"]) for n, m in final.items()} == {
        "imagenet": ("classification", "top1"), "coco": ("detection", "mAP"), "ade20k": ("segmentation", "mIoU")}
    assert final["imagenet"]["value"] > 2 * final["imagenet"]["chance"]
    assert final["coco"]["value"] > final["coco"]["chance"] + 0.5
    assert final["ade20k"]["value"] > 2 * final["ade20k"]["chance"]
    run = tmp_path / "run"
    for name in ("report.md", "losses.png", "metrics.png", "usage.png", "config.yaml", "metrics.jsonl"):
        assert (run / name).is_file(), name
    assert list((run / "tb").glob("events.out.tfevents.*"))
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len([s for s in steps if "loss" in s]) == STEPS
    dropped = [s["routes_dropped"] for s in steps if "mi" in s]  # the capacity's drops, at each logged step
    assert dropped and all(0 <= d < 0.5 for d in dropped) and any(d > 0 for d in dropped), dropped
    assert "## Routes dropped by capacity" in (run / "report.md").read_text()
    assert (run / "checkpoints" / "latest_complete").read_text().strip() == f"step{STEPS:08d}"
    assert "demo finished" in proc.stdout and "report.md" in proc.stdout

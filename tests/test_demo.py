"""The README's main command: `mthl-ds demo` on 2 ranks under the deepspeed launcher."""
import json
import subprocess
import sys


def test_demo_runs_and_learns(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mthl_ds.cli", "demo", "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "final_metrics.json").read_text())
    assert metrics["ranks"] == 2
    assert metrics["final_loss"] < 0.5 * metrics["first_loss"]
    assert metrics["final_acc"] > 3 * metrics["chance_acc"]

"""``make gpu-check``'s driver (mthl_ds/studies/gpu_check.py) on this machine: its tests phase end to end (every
CUDA test collected from the repository and reported, skipped here with the reason), the phase selection of a
second, shorter run, and the report of a phase cut at its time limit."""
import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

from mthl_ds.studies import gpu_check
from mthl_ds.studies.gpu_check import bench_rows, recorded_outcomes, selected_phases

CUDA_TESTS = ("tests/test_cuda.py::test_zero2_run_resumes_bitwise",
              "tests/test_cuda_inference.py::test_evaluate_on_cuda_matches_the_cpu",
              "tests/test_dropless.py::test_looped_experts_equal_gather_experts_then_combine[cuda-dtype4]")


def test_tests_phase_reports_every_cuda_test_of_the_repository(tmp_path):
    """Run from the repository as ``make gpu-check`` runs it, with only the tests phase: the report names each CUDA
    test of every test file (here skipped, with the reason) and the phase passes; a rehearsal an earlier check left
    in the work folder is not reported as this check's. JIT builds (the background FusedLamb's, the bench's) go to
    the package's folder per torch version, also when the check starts without ``TORCH_EXTENSIONS_DIR``."""
    env = {k: v for k, v in os.environ.items() if k != "TORCH_EXTENSIONS_DIR"}
    env.update(OUT=str(tmp_path), GPU_CHECK_PHASES="tests", GPU_CHECK_BUDGET_S="300", CUDA_VISIBLE_DEVICES="")
    earlier = ROOT / "runs" / "gpu_check_work" / "rehearse_bf16" / "rehearsal.md"
    kept = earlier.read_text() if earlier.is_file() else None
    earlier.parent.mkdir(parents=True, exist_ok=True)
    earlier.write_text("# Rehearsal of an earlier check\n")
    try:
        proc = subprocess.run([sys.executable, "-m", "mthl_ds.studies.gpu_check"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)
    finally:
        if kept is None:
            earlier.unlink()
        else:
            earlier.write_text(kept)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_report.json").read_text())
    assert [p["phase"] for p in report["phases"]] == ["tests"] and report["phases"][0]["ok"]
    assert report["environment"]["torch_extensions_dir"].endswith(
        f"/torch{report['environment']['torch']}_py{sys.version_info[0]}{sys.version_info[1]}")
    tests = report["tests"]
    assert set(CUDA_TESTS) <= set(tests), sorted(tests)
    assert len(tests) >= 16 and all(t.startswith("tests/") for t in tests)
    assert all(v.startswith("skipped: needs a CUDA GPU") for v in tests.values()), tests
    markdown = (tmp_path / "gpu_report.md").read_text()
    assert "| tests | ok |" in markdown and CUDA_TESTS[0] in markdown
    assert "rehearse_bf16" not in report and "earlier check" not in markdown
    assert not (ROOT / "mthl_ds" / "runs").exists()  # the work folder is the repository's runs/, not the package's


def test_phases_are_chosen_by_name_in_the_checks_order():
    assert [p[0] for p in selected_phases("bench, tests")] == ["tests", "bench"]
    assert [p[0] for p in selected_phases("")] == ["tests", "rehearse_bf16", "bench", "rehearse_fp16"]
    with pytest.raises(SystemExit, match="unknown phase.*benchmark.*the phases are tests, rehearse_bf16"):
        selected_phases("tests,benchmark")


def test_a_phase_cut_at_its_limit_reports_what_finished_and_what_was_running(tmp_path):
    outcomes = tmp_path / "outcomes.jsonl"
    records = [{"test": "t::a", "outcome": "started"},
               {"test": "t::a", "when": "call", "outcome": "passed", "seconds": 3.5, "message": ""},
               {"test": "t::b", "outcome": "started"},
               {"test": "t::b", "when": "setup", "outcome": "failed", "seconds": 0.1, "message": "OSError: disk"},
               {"test": "t::c", "outcome": "started"},
               {"test": "t::c", "when": "call", "outcome": "failed", "seconds": 1.0, "message": "assert 1 == 2"},
               {"test": "t::d", "outcome": "started"}]
    outcomes.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert recorded_outcomes(outcomes) == {"t::a": "passed (3.5 s)", "t::b": "error in setup: OSError: disk",
                                       "t::c": "failed: assert 1 == 2",
                                       "t::d": "cut: still running at the phase's time limit"}
    assert recorded_outcomes(tmp_path / "none.jsonl") == {}
    row = {"id": "G1", "benchmark": "step", "ratio": 1.1}
    printed = ["[2026] INFO deepspeed", json.dumps(row), "{not json", json.dumps({"id": "x"}), json.dumps(row)]
    assert bench_rows(printed) == [row, row]
    cut = gpu_check.phase_results("bench", printed, tmp_path)
    assert cut["bench_rows"] == [row, row] and cut["bench"].startswith("bench cut at its time limit")
    assert "| G1 | step |" in cut["bench"]


def test_the_tests_phase_cuts_a_hung_test_at_its_timeout(tmp_path, monkeypatch):
    """The phase's pytest command, with pytest-timeout loaded as the GPU image loads it (autoloaded, and named once
    more on the command line), fails a test that outlives ``GPU_CHECK_TEST_TIMEOUT_S`` and goes on to the next."""
    (tmp_path / "test_hung.py").write_text("import time\n\ndef test_hung():\n    time.sleep(60)\n\n"
                                           "def test_next():\n    pass\n")
    monkeypatch.setenv("GPU_CHECK_TEST_TIMEOUT_S", "2")
    command = gpu_check.tests_command([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_hung.py"])
    proc = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=50)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Timeout (>2.0s) from pytest-timeout" in proc.stdout and "1 failed, 1 passed" in proc.stdout, proc.stdout

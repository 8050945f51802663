"""``make gpu-check`` (``python -m mthl_ds.studies.gpu_check``): the project's check of a machine with one CUDA GPU.

Phases, each in its own process with its own time limit, every one run whatever the others did, so that one run
shows every problem:

    env       the machine: GPU, driver, torch / CUDA / NCCL versions, and that every dependency imports
    tests     ``pytest -m cuda``: training of every head in fp16 and bf16, a bitwise ZeRO 2 resume, the
              sync-free step, the memory plan, evaluation and prediction against the CPU
    rehearse  ``mthl-ds rehearse mthl_swin_t --ranks 1`` in bf16, then fp16: the paper's shapes end to end
    bench     ``mthl-ds bench gpu``: the G rows (trainer step MTHL vs MTHL.D, MFU, memory, MoE layer, LAMB vs
              FusedLamb, trainer overhead)

DeepSpeed's FusedLamb (the G5 baseline) is compiled in the background from the start. The report goes to
``$OUT`` (else ``runs/gpu_check``): ``gpu_report.json``, ``gpu_report.md`` and ``gpu_check.log`` (every phase's
output). ``GPU_CHECK_BUDGET_S`` (default 480) bounds the whole run; a phase gets its share of what is left, so time
an earlier phase did not use goes to the later ones.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PHASES = (  # name, share of the budget, command
    ("tests", 0.22, [sys.executable, "-m", "pytest", "-m", "cuda", "tests/test_cuda.py", "tests/test_cuda_inference.py",
                     "-q", "-rA", "--durations=0", "-p", "no:cacheprovider"]),
    ("rehearse_bf16", 0.28, [sys.executable, "-m", "mthl_ds.cli", "rehearse", "mthl_swin_t", "--ranks", "1",
                             "--precision", "bf16", "--no-dense", "--out", "{work}/rehearse_bf16"]),
    ("bench", 0.28, [sys.executable, "-m", "mthl_ds.cli", "bench", "gpu", "--repeats", "5", "--out", "{work}/bench"]),
    ("rehearse_fp16", 0.22, [sys.executable, "-m", "mthl_ds.cli", "rehearse", "mthl_swin_t", "--ranks", "1",
                             "--precision", "fp16", "--no-dense", "--out", "{work}/rehearse_fp16"]),
)
MODULES = ("torch", "torchvision", "timm", "deepspeed", "webdataset", "pycocotools", "segmentation_models_pytorch",
           "safetensors", "yaml", "PIL", "tensorboard", "matplotlib", "scipy", "typing_extensions", "pydantic")


def environment() -> dict:
    """What the machine is and which dependencies import (with versions)."""
    import importlib

    import torch
    info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2 ** 30, 1),
                    capability=f"{props.major}.{props.minor}", gpus=torch.cuda.device_count(),
                    nccl=str(torch.cuda.nccl.version()), bf16=torch.cuda.is_bf16_supported(),
                    driver=subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                          capture_output=True, text=True).stdout.strip())
    modules = {}
    for name in MODULES:
        try:
            module = importlib.import_module(name)
            modules[name] = getattr(module, "__version__", "imported")
        except Exception as e:  # noqa: BLE001  (reported, not raised: the point is to see them all)
            modules[name] = f"FAILED: {type(e).__name__}: {e}"
    info["modules"] = modules
    return info


def start_fused_lamb_build(log) -> subprocess.Popen:
    """Compile DeepSpeed's fused LAMB op (JIT, nvcc) in the background for the bench phase."""
    code = "from deepspeed.ops.op_builder import FusedLambBuilder; FusedLambBuilder().load(); print('fused_lamb built')"
    env = dict(os.environ, MAX_JOBS=os.environ.get("MAX_JOBS", str(os.cpu_count() or 4)))
    return subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def run_phase(name: str, command: list[str], limit: float, log) -> dict:
    """Run one phase with a time limit; its output goes to the log. Returns its outcome."""
    log.write(f"\n===== {name} (limit {limit:.0f} s): {' '.join(command)}\n")
    log.flush()
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"), start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=limit)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, _ = proc.communicate()
        rc = "timeout"
    lines = out.splitlines()
    log.write(out)
    log.flush()
    return {"phase": name, "rc": rc, "ok": rc == 0, "seconds": round(time.perf_counter() - start, 1),
            "tail": lines[-40:]}


def pytest_outcomes(lines: list[str]) -> dict:
    """Per-test outcome from pytest's ``-rA`` summary lines."""
    outcomes = {}
    for line in lines:
        m = re.match(r"(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\s+(\S+)(?:\s+-\s+(.*))?", line)
        if m and "::" in m.group(2):
            outcomes[m.group(2)] = m.group(1) + (f": {m.group(3)[:300]}" if m.group(3) else "")
    return outcomes


def test_notes(lines: list[str]) -> list[str]:
    """What the CUDA tests print for the report: DeepSpeed's host syncs in a step, the memory plan's figures."""
    notes, taking = [], False
    for line in lines:
        if line.startswith(("host syncs of a steady-state", "memory, GiB")):
            taking = line.startswith("host syncs")
            notes.append(line)
        elif taking and line.startswith("  "):
            notes.append(line)
        else:
            taking = False
    return notes


def report_markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# GPU check: {env.get('gpu', 'no GPU')}", "",
             f"python {env['python']}, torch {env['torch']} (CUDA {env['cuda']}), NCCL {env.get('nccl')}, "
             f"capability {env.get('capability')}, {env.get('gpu_memory_gib')} GiB; wall {report['wall_s']:.0f} s", "",
             "| module | version |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in env["modules"].items()]
    lines += ["", "| phase | result | seconds |", "|---|---|---|"]
    lines += [f"| {p['phase']} | {'ok' if p['ok'] else 'FAILED (' + str(p['rc']) + ')'} | {p['seconds']} |"
              for p in report["phases"]]
    if report.get("tests"):
        lines += ["", "| test | outcome |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in report["tests"].items()]
    if report.get("notes"):
        lines += ["", "```", *report["notes"], "```"]
    for name in ("rehearse_bf16", "rehearse_fp16"):
        if report.get(name):
            lines += ["", report[name]]
    if report.get("bench"):
        lines += ["", report["bench"]]
    for p in report["phases"]:
        if not p["ok"]:
            lines += ["", f"## {p['phase']}: last lines", "```", *p["tail"], "```"]
    return "\n".join(lines) + "\n"


def main() -> int:
    budget = float(os.environ.get("GPU_CHECK_BUDGET_S", "480"))
    start = time.perf_counter()
    import torch
    if torch.cuda.is_available():  # one target for every JIT build (FusedLamb), so the bench reuses the background
        major, minor = torch.cuda.get_device_capability(0)  # one; DeepSpeed's builder cannot parse "9.0a"
        os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before any cuBLAS call: the bitwise-resume test
    out = Path(os.environ.get("OUT") or ROOT / "runs" / "gpu_check")
    work = ROOT / "runs" / "gpu_check_work"
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    report: dict = {"environment": environment(), "phases": []}
    print(json.dumps(report["environment"], indent=1), flush=True)
    with open(out / "gpu_check.log", "w") as log:
        builder = start_fused_lamb_build(log)
        for index, (name, share, command) in enumerate(PHASES):
            left = budget - (time.perf_counter() - start)
            limit = left * share / sum(s for _, s, _ in PHASES[index:])
            if left < 20:
                report["phases"].append({"phase": name, "rc": "no time left", "ok": False, "seconds": 0, "tail": []})
                continue
            if name == "bench" and builder.poll() is None:
                builder.wait(timeout=max(1.0, min(120.0, left / 3)))
            command = [c.format(work=work) for c in command]
            outcome = run_phase(name, command, limit, log)
            report["phases"].append(outcome)
            print(f"{name}: {'ok' if outcome['ok'] else 'FAILED'} in {outcome['seconds']} s", flush=True)
        if builder.poll() is None:
            builder.kill()
    log_lines = (out / "gpu_check.log").read_text().splitlines()
    report["tests"] = pytest_outcomes(log_lines)
    report["notes"] = test_notes(log_lines)
    for name in ("rehearse_bf16", "rehearse_fp16"):
        md = work / name / "rehearsal.md"
        report[name] = md.read_text() if md.is_file() else None
    bench_md = work / "bench" / "bench_gpu.md"
    report["bench"] = bench_md.read_text() if bench_md.is_file() else None
    bench_json = work / "bench" / "bench_gpu.json"
    report["bench_rows"] = json.loads(bench_json.read_text()) if bench_json.is_file() else None
    report["wall_s"] = time.perf_counter() - start
    (out / "gpu_report.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / "gpu_report.md").write_text(report_markdown(report))
    print(report_markdown(report), flush=True)
    return 0 if all(p["ok"] for p in report["phases"]) else 1


if __name__ == "__main__":
    sys.exit(main())

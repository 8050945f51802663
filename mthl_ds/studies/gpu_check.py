"""``make gpu-check`` (``python -m mthl_ds.studies.gpu_check``): the project's check of a machine with one CUDA GPU.

Phases, each in its own process with its own time limit, every one run whatever the others did, so that one run
shows every problem:

    env       the machine: GPU, driver, torch / CUDA / NCCL versions, and that every dependency imports
    tests     ``pytest -m cuda tests``: every CUDA test (training of every head in fp16 and bf16, a bitwise ZeRO 2
              resume, the sync-free step, the memory plan, the dropless experts, evaluation and prediction
              against the CPU), each cut at ``GPU_CHECK_TEST_TIMEOUT_S`` where pytest-timeout is installed
    rehearse  ``mthl-ds rehearse mthl_swin_t --ranks 1`` in bf16, then fp16: the paper's shapes end to end
    bench     ``mthl-ds bench gpu``: the G rows (trainer step MTHL vs MTHL.D, MFU, memory, MoE layer, LAMB vs
              FusedLamb, trainer overhead)

DeepSpeed's FusedLamb (the G5 baseline) is compiled in the background from the start. The report goes to
``$OUT`` (else ``runs/gpu_check``): ``gpu_report.json``, ``gpu_report.md`` and ``gpu_check.log`` (every phase's
output). ``GPU_CHECK_BUDGET_S`` (default 480) bounds the whole run; a phase gets its share of what is left, so time
an earlier phase did not use goes to the later ones. ``GPU_CHECK_PHASES`` (say ``tests,bench``) runs only those
phases, for a second, shorter run after a fix. A phase cut at its limit still reports what it finished: each
test's outcome is written as it ends (``MTHL_TEST_OUTCOMES``, tests/conftest.py), each bench row as it is measured.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository: tests/, ds_configs/, runs/
PHASES = (  # name, share of the budget, command
    ("tests", 0.28, [sys.executable, "-m", "pytest", "-m", "cuda", "tests", "-q", "-rA", "--durations=0",
                     "-p", "no:cacheprovider"]),
    ("rehearse_bf16", 0.24, [sys.executable, "-m", "mthl_ds.cli", "rehearse", "mthl_swin_t", "--ranks", "1",
                             "--precision", "bf16", "--no-dense", "--out", "{work}/rehearse_bf16"]),
    ("bench", 0.30, [sys.executable, "-m", "mthl_ds.cli", "bench", "gpu", "--repeats", "3", "--out", "{work}/bench"]),
    ("rehearse_fp16", 0.18, [sys.executable, "-m", "mthl_ds.cli", "rehearse", "mthl_swin_t", "--ranks", "1",
                             "--precision", "fp16", "--no-dense", "--out", "{work}/rehearse_fp16"]),
)
MODULES = ("torch", "torchvision", "timm", "deepspeed", "webdataset", "pycocotools", "segmentation_models_pytorch",
           "safetensors", "yaml", "PIL", "tensorboard", "matplotlib", "scipy", "typing_extensions", "pydantic")


def environment() -> dict:
    """What the machine is and which dependencies import (with versions)."""
    import importlib

    import torch
    info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(), "torch_extensions_dir": os.environ.get("TORCH_EXTENSIONS_DIR")}
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


def run_phase(name: str, command: list[str], limit: float, log, env: dict | None = None) -> dict:
    """Run one phase with a time limit; its output goes to the log. Returns its outcome and its output's lines."""
    log.write(f"\n===== {name} (limit {limit:.0f} s): {' '.join(command)}\n")
    log.flush()
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})), start_new_session=True)
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
            "tail": lines[-40:], "lines": lines}


def selected_phases(names: str | None) -> list[tuple[str, float, list[str]]]:
    """The phases ``GPU_CHECK_PHASES`` names (comma-separated; empty or unset: all), in the check's order."""
    known = [name for name, _, _ in PHASES]
    wanted = [n.strip() for n in (names or "").split(",") if n.strip()] or known
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise SystemExit(f"GPU_CHECK_PHASES: unknown phase(s) {', '.join(unknown)}; the phases are {', '.join(known)}")
    return [phase for phase in PHASES if phase[0] in wanted]


def tests_command(command: list[str]) -> list[str]:
    """The tests phase's pytest command, each test cut at ``GPU_CHECK_TEST_TIMEOUT_S`` (default 150) where
    pytest-timeout is installed (the GPU image has it), so one hung test does not take the phase's whole time.
    The plugin is named by its entry point, ``timeout``: pytest then loads it once whether or not plugins
    autoload (``-p pytest_timeout`` registers the module a second time, under another name, and pytest refuses)."""
    import importlib.util
    if importlib.util.find_spec("pytest_timeout") is None:
        return command
    return command + ["-p", "timeout", "--timeout", os.environ.get("GPU_CHECK_TEST_TIMEOUT_S", "150")]


def recorded_outcomes(path: Path) -> dict[str, str]:
    """Each test's outcome from the JSON lines tests/conftest.py writes as tests start and end: ``passed (s)``,
    ``skipped: reason``, ``failed: message`` (a failed setup or teardown: ``error in setup: ...``), or, for a test
    that started and never ended, that the phase's time limit cut it."""
    outcomes: dict[str, str] = {}
    lines = path.read_text().splitlines() if path.is_file() else []
    for record in map(json.loads, lines):
        test, outcome = record["test"], record["outcome"]
        if outcome == "started":
            outcomes[test] = "cut: still running at the phase's time limit"
        elif outcome == "passed":
            outcomes[test] = f"passed ({record['seconds']} s)"
        elif record["when"] == "call" or outcome == "skipped":
            outcomes[test] = f"{outcome}: {record['message']}"
        else:  # a failed setup (a fixture) or teardown
            outcomes[test] = f"error in {record['when']}: {record['message']}"
    return outcomes


def printed_notes(lines: list[str]) -> list[str]:
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


def bench_rows(lines: list[str]) -> list[dict]:
    """The rows ``mthl-ds bench gpu`` printed as it measured them (one JSON object per line): all of them when it
    finished, what it had when its time ran out."""
    rows = []
    for line in lines:
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict) and {"id", "benchmark"} <= set(value):
                rows.append(value)
    return rows


def phase_results(name: str, lines: list[str], folder: Path) -> dict:
    """What a phase that ran adds to the report, from its output and its work folder (cleared before it ran, so
    nothing an earlier check left): the tests' outcomes and printed notes, a rehearsal's table, the bench's rows and
    table (cut before it wrote its table: the rows it printed)."""
    if name == "tests":
        return {"tests": recorded_outcomes(folder / "outcomes.jsonl"), "notes": printed_notes(lines)}
    if name.startswith("rehearse"):
        md = folder / "rehearsal.md"
        return {name: md.read_text() if md.is_file() else None}
    rows = bench_rows(lines)
    md = folder / "bench_gpu.md"
    if md.is_file() or not rows:
        return {"bench_rows": rows, "bench": md.read_text() if md.is_file() else None}
    from mthl_ds.studies.bench.common import markdown_table
    from mthl_ds.studies.bench.suite import COLUMNS  # imports DeepSpeed: here, not where a missing one is reported
    return {"bench_rows": rows,
            "bench": "bench cut at its time limit; the rows it measured:\n\n" + markdown_table(rows, COLUMNS)}


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
    phases = selected_phases(os.environ.get("GPU_CHECK_PHASES"))
    budget = float(os.environ.get("GPU_CHECK_BUDGET_S", "480"))
    start = time.perf_counter()
    import torch
    if torch.cuda.is_available():  # one target for every JIT build (FusedLamb), so the bench reuses the background
        major, minor = torch.cuda.get_device_capability(0)  # one; DeepSpeed's builder cannot parse "9.0a"
        os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
    from mthl_ds.runtime import accelerator  # noqa: F401  (sets TORCH_EXTENSIONS_DIR: the background FusedLamb
    # build and the bench, which imports the package, then build into and load from the same folder)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before any cuBLAS call: the bitwise-resume test
    out = Path(os.environ.get("OUT") or ROOT / "runs" / "gpu_check")
    work = ROOT / "runs" / "gpu_check_work"
    out.mkdir(parents=True, exist_ok=True)
    for name, _, _ in phases:  # what an earlier check left is not this one's result
        shutil.rmtree(work / name, ignore_errors=True)
        (work / name).mkdir(parents=True)
    report: dict = {"environment": environment(), "phases": []}
    print(json.dumps(report["environment"], indent=1), flush=True)
    with open(out / "gpu_check.log", "w") as log:
        builder = start_fused_lamb_build(log) if any(name == "bench" for name, _, _ in phases) else None
        for index, (name, share, command) in enumerate(phases):
            left = budget - (time.perf_counter() - start)
            limit = left * share / sum(s for _, s, _ in phases[index:])
            if left < 20:
                report["phases"].append({"phase": name, "rc": "no time left", "ok": False, "seconds": 0, "tail": []})
                continue
            if name == "bench" and builder.poll() is None:
                builder.wait(timeout=max(1.0, min(120.0, left / 3)))
            command = [c.format(work=work) for c in command]
            env = None
            if name == "tests":
                command = tests_command(command)
                env = {"MTHL_TEST_OUTCOMES": str(work / name / "outcomes.jsonl")}
            outcome = run_phase(name, command, limit, log, env)
            report.update(phase_results(name, outcome.pop("lines"), work / name))
            report["phases"].append(outcome)
            print(f"{name}: {'ok' if outcome['ok'] else 'FAILED'} in {outcome['seconds']} s", flush=True)
        if builder is not None and builder.poll() is None:
            builder.kill()
    report["wall_s"] = time.perf_counter() - start
    (out / "gpu_report.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / "gpu_report.md").write_text(report_markdown(report))
    print(report_markdown(report), flush=True)
    return 0 if all(p["ok"] for p in report["phases"]) else 1


if __name__ == "__main__":
    sys.exit(main())

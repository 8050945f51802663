import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WORKERS = Path(__file__).resolve().parent / "workers"
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(worker: str, nprocs: int, args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``tests/workers/<worker>`` on ``nprocs`` local gloo ranks with torchrun; fail with its output."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nprocs}",
           f"--master_port={free_port()}", str(WORKERS / worker), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        pytest.fail(f"{worker} on {nprocs} ranks failed (rc {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc

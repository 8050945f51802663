"""The deepspeed launcher's command line for a training run on this machine's ranks (the demo and the rehearsal
start their runs with it)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from mthl_ds.runtime.engine import free_port


def train_command(ranks: int, recipe: str, out: Path, overrides: Sequence[str] = (), cpu_fp16: bool = False
                  ) -> list[str]:
    """``python -m deepspeed.launcher.runner`` running ``mthl-ds train`` (``--module mthl_ds train``) on ``ranks``
    local ranks (GPUs, or CPU ranks on DeepSpeed's CPU accelerator) on a free loopback port.

    Args:
        ranks: local ranks (the launcher's ``--num_gpus``).
        recipe: the recipe's name or path.
        out: the run folder.
        overrides: ``KEY=VALUE`` settings, each given as ``--set``.
        cpu_fp16: fp16 on CPU ranks (the job's ``--cpu-fp16``).
    """
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port",
           str(free_port()), "--module", "mthl_ds", "train", *(["--cpu-fp16"] if cpu_fp16 else []),
           "--recipe", recipe, "--out", str(out)]
    for o in overrides:
        cmd += ["--set", o]
    return cmd

"""The plain-JSON files of a run folder, written and read here only (no torch):

    RUN/metrics.jsonl                  one JSON row per line, oldest first, each with its ``kind``:
        "train"  a training step: step, dataset, loss, its parts, router losses, lr, seconds, ...
        "eval"   an evaluation: {"step": steps done, "eval": {dataset: results}}
        "aes"    an AES check (AdaMV-MoE): {"step": steps done, "aes": {held-out losses, K, changes}}
        "checkpoint"  a resume that passed over damaged checkpoints: {"step": the step resumed at,
                 "checkpoint": {"resumed_from": tag, "damaged": [{"tag", "problems"}], "moved_to": folder}}
    RUN/checkpoints/<tag>/run.json     a complete checkpoint's record (step, world size, recipe, model)

Rows written before rows had a ``kind`` are read by the rule used then: a row with a ``loss`` is a training
step; otherwise the key that holds its content (``eval``, ``aes``) names it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

METRICS_FILE = "metrics.jsonl"
RUN_RECORD = "run.json"
ROW_KINDS = ("train", "eval", "aes", "checkpoint")


# ---------------------------------------------------------------------------------------------- metrics.jsonl

def row_kind(row: dict) -> str:
    """The kind of a metrics row: its ``kind``, or, for a row written without one, the old rule."""
    if "kind" in row:
        return row["kind"]
    if "loss" in row:
        return "train"
    for kind in ("eval", "aes"):
        if kind in row:
            return kind
    raise ValueError(f"a metrics row of no known kind (keys {sorted(row)})")


def parse_row(line: str) -> dict:
    """One line of ``metrics.jsonl`` as a row that names its kind (first), also when it was written without."""
    row = json.loads(line)
    return row if "kind" in row else {"kind": row_kind(row), **row}


def read_metrics(run_dir: Path, kind: Optional[str] = None) -> list[dict]:
    """The rows of ``run_dir``'s ``metrics.jsonl``, oldest first (only those of ``kind`` if given), each with its
    ``kind``. A run that has logged nothing yet has no rows."""
    if kind is not None and kind not in ROW_KINDS:
        raise ValueError(f"metrics row kind {kind!r}: choose from {ROW_KINDS}")
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    rows = [parse_row(line) for line in path.read_text().splitlines() if line.strip()]
    return rows if kind is None else [r for r in rows if r["kind"] == kind]


def keep_metrics(run_dir: Path, keep: Callable[[dict], bool]) -> list[dict]:
    """Rewrite ``run_dir``'s ``metrics.jsonl`` with only the rows ``keep`` accepts (each line as it was written)
    and return those rows (with their ``kind``). What a resumed run does with the rows a killed one logged after
    its last checkpoint."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    kept = [(line, row) for line in path.read_text().splitlines() if line.strip()
            for row in [parse_row(line)] if keep(row)]
    path.write_text("".join(line + "\n" for line, _ in kept))
    return [row for _, row in kept]


class MetricsLog:
    """Appends rows to a run's ``metrics.jsonl``: :meth:`write` adds the row's ``kind`` (its first key)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / METRICS_FILE
        self.file = self.path.open("a")

    def write(self, kind: str, row: dict) -> dict:
        """Append ``row`` as a row of ``kind``; returns it as written (with its ``kind``)."""
        if kind not in ROW_KINDS:
            raise ValueError(f"metrics row kind {kind!r}: choose from {ROW_KINDS}")
        row = {"kind": kind, **{k: v for k, v in row.items() if k != "kind"}}
        self.file.write(json.dumps(row) + "\n")
        return row

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        self.file.close()


# ----------------------------------------------------------------------------------------- a checkpoint's run.json

def write_run_record(folder: Path, record: dict) -> Path:
    """Write a checkpoint folder's ``run.json`` (tuples and sets as lists)."""
    path = Path(folder) / RUN_RECORD
    path.write_text(json.dumps(record, indent=1, default=list))
    return path


def read_run_record(folder: Path) -> dict:
    """A checkpoint folder's ``run.json``."""
    return json.loads((Path(folder) / RUN_RECORD).read_text())

"""Checkpoint manifests: every file of a checkpoint with its size and checksum, so that a reader knows that what
it reads is what was written.

A step folder's ``manifest.json`` lists each file DeepSpeed and the trainer wrote (model states, one file per
expert, optimizer shards, each rank's state, ``run.json``) with its size in bytes and its xxh3-64 checksum
(xxHash's XXH3, 64-bit: fast enough that reading the file, not hashing it, sets the cost). The trainer writes
it into the step folder before the ``latest_complete`` pointer moves, inside the same commit, so a step that
claims to be complete has one. Readers verify against it before loading: a file whose size or checksum differs,
or that is missing, is named with what was expected and what was found. A checkpoint written before manifests
existed has none; it still loads, with a warning.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import xxhash

MANIFEST = "manifest.json"
FORMAT = "mthl-ds-manifest/1"
ALGORITHM = "xxh3_64"
CHUNK = 16 << 20


def digest(path: Path) -> dict:
    """``{"bytes": size, "xxh3_64": hex}`` of one file, read in chunks."""
    h = xxhash.xxh3_64()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
            size += len(block)
    return {"bytes": size, ALGORITHM: h.hexdigest()}


def step_files(folder: Path) -> list[str]:
    """The files of a step folder a manifest covers: every regular file (sorted), the manifest itself excepted."""
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*") if p.is_file() and p.name != MANIFEST)


def describe(folder: Path, names: Iterable[str]) -> dict[str, dict]:
    return {name: digest(Path(folder) / name) for name in names}


def write(folder: Path, files: dict[str, dict], step: int) -> Path:
    """Write ``folder``'s manifest atomically (a temporary file, then a rename)."""
    path = Path(folder) / MANIFEST
    tmp = path.with_name(f".{MANIFEST}.tmp")
    tmp.write_text(json.dumps({"format": FORMAT, "algorithm": ALGORITHM, "step": step,
                               "files": dict(sorted(files.items()))}, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def read(folder: Path) -> Optional[dict]:
    """``folder``'s manifest, or None where it has none (a checkpoint written before manifests)."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        if manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
            raise ValueError(f"not a {FORMAT} manifest")
    except (OSError, ValueError) as e:
        return {"format": FORMAT, "files": {}, "unreadable": f"{path}: unreadable manifest ({e})"}
    return manifest


@dataclass(frozen=True)
class Problem:
    """One file that is not as the manifest says: missing, another size, another checksum."""
    file: str
    what: str

    def __str__(self) -> str:
        return f"{self.file}: {self.what}"


def check_file(folder: Path, name: str, expected: dict) -> Optional[Problem]:
    path = Path(folder) / name
    if not path.is_file():
        return Problem(name, f"missing (expected {expected['bytes']} bytes, {ALGORITHM} {expected[ALGORITHM]})")
    size = path.stat().st_size
    if size != expected["bytes"]:  # cheap: no need to read a file of the wrong size
        return Problem(name, f"expected {expected['bytes']} bytes ({ALGORITHM} {expected[ALGORITHM]}), found {size}")
    found = digest(path)
    if found[ALGORITHM] != expected[ALGORITHM]:
        return Problem(name, f"{ALGORITHM} expected {expected[ALGORITHM]}, found {found[ALGORITHM]} "
                             f"(size {size} bytes as expected)")
    return None


def verify(folder: Path, manifest: dict, share: tuple[int, int] = (0, 1)) -> list[Problem]:
    """The problems of ``folder`` against ``manifest`` (empty: every file as written). ``share`` = (rank, ranks):
    check only every ``ranks``-th file from the ``rank``-th, so that ranks split the reading."""
    if "unreadable" in manifest:
        return [Problem(MANIFEST, manifest["unreadable"])]
    rank, ranks = share
    names = sorted(manifest["files"])[rank::ranks]
    return [p for p in (check_file(folder, n, manifest["files"][n]) for n in names) if p is not None]

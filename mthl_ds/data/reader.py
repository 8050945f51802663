"""Reading shard sets: deterministic training streams and exactly-once evaluation streams.

Training: in epoch e, the shard list is permuted by (seed, e) and dealt out to the ``world x workers``
reader slots; each slot reads a whole shard and visits its samples in a permutation keyed on
(seed, e, shard). Every slot therefore owns a fixed sequence of *ordinals* (one per indexed sample, decoded
or not), augmentations are keyed on (seed, slot, ordinal), and a stream resumes exactly from the ordinal
of the last sample it handed out, skipping whole shards by their indexed counts without reading them.

Evaluation: every rank reads every shard in order and keeps samples ``i % world == rank`` (and
``(i // world) % workers == worker``); each reader pads its share to the same whole number of batches
with samples marked ``valid = False``, so all ranks run the same number of equal-sized batches (expert
parallelism needs that) and each val sample is seen exactly once.

A sample that fails to decode, or a tar member that cannot be read, is skipped with a warning naming the
shard and key and counted; it never stalls a rank (no sleeping) and never shifts another sample's ordinal.
"""
from __future__ import annotations

import json
import logging
import math
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from mthl_ds.data.shards import INDEX, ShardError

log = logging.getLogger("mthl_ds.reader")


@dataclass
class ShardSet:
    """A shard folder and its index; opening checks the set is usable and names what is wrong."""
    root: Path
    index: dict

    @classmethod
    def open(cls, root: str | Path) -> "ShardSet":
        root = Path(root)
        path = root / INDEX
        if not path.is_file():
            raise ShardError(f"{root}: no {INDEX}; convert the dataset with `mthl-ds shards` first")
        try:
            index = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ShardError(f"{path}: not valid JSON ({e})") from None
        if not index.get("shards") or not index.get("num_samples"):
            raise ShardError(f"{path}: the shard set is empty")
        missing = [s["name"] for s in index["shards"] if not (root / s["name"]).is_file()]
        if missing:
            raise ShardError(f"{root}: shard file(s) missing: {', '.join(missing[:5])}")
        return cls(root, index)

    @property
    def task(self) -> str:
        return self.index["task"]

    @property
    def shards(self) -> list[dict]:
        return self.index["shards"]

    def __len__(self) -> int:
        return self.index["num_samples"]

    def check_split(self, world: int, workers: int) -> None:
        """Training needs a shard for every reader slot, or a rank would read nothing and hang the others."""
        slots = world * max(1, workers)
        if len(self.shards) < slots:
            raise ShardError(f"{self.root}: {len(self.shards)} shards for {world} ranks x {max(1, workers)} "
                             f"workers = {slots} readers; re-convert with a smaller --shard-size "
                             f"(at most {len(self) // slots} samples per shard)")


def read_shard(path: Path, expected: Optional[int] = None) -> tuple[list[tuple[str, dict]], int]:
    """All samples of one tar as (key, {ext: bytes}); stops at a corrupt member and counts what was lost.

    ``tarfile`` ends iteration silently at a damaged header in mid-file, so the count is checked against
    the index (``expected``) too.
    """
    samples: list[tuple[str, dict]] = []
    errors = 0
    try:
        with tarfile.open(path, "r") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = member.name.split(".", 1)
                data = tar.extractfile(member).read()
                if samples and samples[-1][0] == key:
                    samples[-1][1][ext] = data
                else:
                    samples.append((key, {ext: data}))
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        last = samples[-1][0] if samples else "(start)"
        log.warning("%s: unreadable tar after key %s (%s); the rest of the shard is skipped", path, last, e)
        errors += 1
    if expected is not None and len(samples) < expected and not errors:
        last = samples[-1][0] if samples else "(start)"
        log.warning("%s: damaged tar, read %d of %d samples (stopped after key %s); the rest is skipped",
                    path, len(samples), expected, last)
        errors += 1
    return samples, errors


class TrainStream(IterableDataset):
    """Endless, deterministic training samples of one rank from a shard set.

    Args:
        shard_set: the set to read.
        decode: ``(sample_dict, rng) -> item``; gets the raw members plus ``__key__``, and a generator
            keyed on (seed, slot, ordinal) for augmentation. Raising skips the sample with a warning;
            returning None leaves it out quietly (a filter, e.g. detection images without annotations).
        rank, world: this rank and the number of ranks reading the set.
        seed: the run's seed.
        resume: ``{worker_id: last ordinal handed out}`` from :class:`LoaderState`.
        exclude: ``{shard number: {sample index}}`` never to hand out (a held-out split); they keep their
            ordinals, so the other samples' order and augmentations do not change.
    """

    def __init__(self, shard_set: ShardSet, decode: Callable, rank: int = 0, world: int = 1, seed: int = 0,
                 resume: Optional[dict[int, int]] = None, exclude: Optional[dict[int, set[int]]] = None):
        self.shard_set, self.decode = shard_set, decode
        self.rank, self.world, self.seed = rank, world, seed
        self.resume = dict(resume or {})
        self.exclude = exclude or {}

    def _slot(self) -> tuple[int, int, int]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        return worker, self.rank * workers + worker, self.world * workers

    def __iter__(self) -> Iterator[dict]:
        worker, slot, slots = self._slot()
        shards = self.shard_set.shards
        if len(shards) < slots:
            raise ShardError(f"{self.shard_set.root}: {len(shards)} shards for {slots} reader slots")
        start = self.resume.get(worker, -1) + 1
        ordinal, skipped, idle_passes = 0, 0, 0
        for epoch in range(2 ** 62):
            read, yielded = False, False
            order = np.random.default_rng([self.seed, epoch]).permutation(len(shards))[slot::slots]
            for shard_no in order:
                shard = shards[shard_no]
                if ordinal + shard["num_samples"] <= start:  # resume: skip without reading
                    ordinal += shard["num_samples"]
                    continue
                samples, errors = read_shard(self.shard_set.root / shard["name"], shard["num_samples"])
                skipped += errors
                read = True
                visit = np.random.default_rng([self.seed, epoch, int(shard_no)]).permutation(shard["num_samples"])
                excluded = self.exclude.get(int(shard_no), ())
                for i in visit:
                    ordinal += 1
                    if ordinal - 1 < start or i in excluded:
                        continue
                    if i >= len(samples):
                        continue  # lost to a corrupt tar: already reported
                    key, members = samples[i]
                    try:
                        rng = np.random.default_rng([self.seed, slot, ordinal - 1])
                        item = self.decode({"__key__": key, **members}, rng)
                    except Exception as e:  # a broken sample is skipped, never retried, never slept on
                        skipped += 1
                        log.warning("%s: sample %s skipped (%s: %s); %d skipped so far on this reader",
                                    shard["name"], key, type(e).__name__, e, skipped)
                        continue
                    if item is None:  # filtered by the pipeline (not an error): keeps its ordinal
                        continue
                    item.update(__key__=key, __ordinal__=ordinal - 1, __worker__=worker)
                    yielded = True
                    yield item
            if ordinal == 0:
                raise ShardError(f"{self.shard_set.root}: reader slot {slot} owns no samples")
            idle_passes = 0 if yielded or not read else idle_passes + 1
            if idle_passes == 3:  # would spin forever, and hang the other ranks
                raise ShardError(f"{self.shard_set.root}: reader slot {slot} found no usable sample in 3 passes over "
                                 "its shards (every one filtered or broken)")


class EvalStream(IterableDataset):
    """Each val sample exactly once across ranks; every reader yields the same padded count.
    ``only``: ``{shard number: {sample index}}`` to read instead of every sample (a held-out split)."""

    def __init__(self, shard_set: ShardSet, decode: Callable, rank: int = 0, world: int = 1, batch_size: int = 1,
                 only: Optional[dict[int, set[int]]] = None):
        self.shard_set, self.decode = shard_set, decode
        self.rank, self.world, self.batch_size = rank, world, batch_size
        self.only = only
        self.num_samples = len(shard_set) if only is None else sum(len(v) for v in only.values())

    def per_reader(self, workers: int) -> int:
        per_rank = math.ceil(self.num_samples / self.world)
        return math.ceil(math.ceil(per_rank / workers) / self.batch_size) * self.batch_size

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        quota = self.per_reader(workers)
        produced, last = 0, None
        index = 0
        for shard_no, shard in enumerate(self.shard_set.shards):
            if self.only is not None and shard_no not in self.only:
                continue
            samples, _ = read_shard(self.shard_set.root / shard["name"], shard["num_samples"])
            for position, (key, members) in enumerate(samples):
                if self.only is not None and position not in self.only[shard_no]:
                    continue
                mine = index % self.world == self.rank and (index // self.world) % workers == worker
                index += 1
                if not mine:
                    continue
                try:
                    item = self.decode({"__key__": key, **members}, None)
                except Exception as e:
                    log.warning("%s: eval sample %s skipped (%s: %s)", shard["name"], key, type(e).__name__, e)
                    continue
                item.update(__key__=key, valid=True)
                last = item
                produced += 1
                yield item
        if last is None and produced < quota:
            raise ShardError(f"{self.shard_set.root}: eval reader {self.rank}/{worker} got no sample to pad with")
        while produced < quota:
            produced += 1
            yield {**last, "valid": False}


class LoaderState:
    """The last ordinal each DataLoader worker handed out, read off consumed batches; saved in checkpoints."""

    def __init__(self, state: Optional[dict] = None):
        self.last = {int(k): int(v) for k, v in (state or {}).items()}

    def observe(self, batch: dict) -> None:
        for worker, ordinal in zip(batch["__worker__"].tolist(), batch["__ordinal__"].tolist()):
            self.last[worker] = max(self.last.get(worker, -1), ordinal)

    def state_dict(self) -> dict:
        return dict(self.last)


def worker_init(_):
    """DataLoader workers: one thread each, so readers do not fight the training ranks for cores."""
    torch.set_num_threads(1)

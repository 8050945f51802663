"""The task kinds, one :class:`~mthl_ds.tasks.spec.TaskSpec` each: what builds a dataset's head, scores it,
turns its output into a prediction and fakes a batch of it. Everything that differs by kind asks here."""
from __future__ import annotations

import dataclasses

import torch

from mthl_ds.config import Recipe
from mthl_ds.geometry import input_shape
from mthl_ds.tasks import classification, detection, segmentation
from mthl_ds.tasks.spec import TaskSpec

TASKS: dict[str, TaskSpec] = {spec.kind: spec for spec in (classification.SPEC, detection.SPEC, segmentation.SPEC)}


def task_spec(kind: str) -> TaskSpec:
    if kind not in TASKS:
        raise ValueError(f"unknown task {kind!r}; the task kinds are {sorted(TASKS)}")
    return TASKS[kind]


def fake_batch(recipe: Recipe, name: str, seed: int = 0, batch_size: int = 0) -> dict:
    """A batch of dataset ``name``'s shapes (random pixels and targets) at its input shape (the detection canvas):
    benchmarks and the memory plan need shapes, not content. ``batch_size``: 0 for the dataset's."""
    d = recipe.datasets[name]
    d = dataclasses.replace(d, batch_size=batch_size) if batch_size else d
    gen = torch.Generator().manual_seed(seed)
    shape = input_shape(d.task, d.size)
    batch = {"image": torch.randn(d.batch_size, 3, *shape, generator=gen)}
    return {**batch, **task_spec(d.task).fake_targets(d.num_classes, d.batch_size, shape, gen)}

"""What a task kind is to the rest of the package: one :class:`TaskSpec` per kind (classification, detection,
segmentation), registered in ``mthl_ds.tasks``. A new kind is one spec plus its modules: a head in
``mthl_ds.models.heads``, a metric in ``mthl_ds.analysis.metrics``, a decoder in ``mthl_ds.data.pipelines``;
its input shape rule is ``mthl_ds.geometry.input_shape`` (which recipes are checked with before torch loads)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from mthl_ds.analysis.metrics import ReduceSum
from mthl_ds.config import DatasetConfig
from mthl_ds.data.reader import ShardSet
from mthl_ds.runtime.device import DeviceLike


@dataclass(frozen=True)
class TaskSpec:
    """One task kind.

    Args:
        kind: the name recipes, shard sets and exports use (``DatasetConfig.task``).
        build_head: (backbone stage channels, the dataset's config) -> the head module.
        make_evaluator: (num_classes, val shard set, ground truth or None, device) -> a metric accumulator of
            ``mthl_ds.analysis.metrics``; its ``metric`` names the headline figure.
        chance_level: (evaluator after the val set, num_classes, reduce_sum) -> the headline figure of a guess.
        protocol: (val shard set, annotations path or None, original resolution) -> how it is scored, in words.
        output_to_cpu: a head's ``predict`` output for a batch -> the same on the CPU, in one copy.
        prediction: (one image's output on the CPU, class names or None) -> its JSON-ready result.
        fake_targets: (num_classes, batch size, input shape, generator) -> random targets of the batch's keys.
    """
    kind: str
    build_head: Callable[[Sequence[int], DatasetConfig], nn.Module]
    make_evaluator: Callable[[int, Optional[ShardSet], Optional[dict], DeviceLike], Any]
    chance_level: Callable[[Any, int, ReduceSum], float]
    protocol: Callable[[ShardSet, Optional[Path], bool], str]
    output_to_cpu: Callable[[Any], Any]
    prediction: Callable[[Any, Optional[list]], dict]
    fake_targets: Callable[[int, int, tuple[int, int], torch.Generator], dict]


def class_name(classes: Optional[list], label: int) -> str:
    """A class's name from a shard index's ``classes`` (names, or COCO category dicts); ``class_N`` without."""
    if not classes:
        return f"class_{label}"
    entry = classes[label]
    return entry["name"] if isinstance(entry, dict) else str(entry)

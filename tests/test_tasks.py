"""The task-kind registry: one spec per kind that recipes accept, each of whose parts works with the others (a head
built by the spec learns from the spec's fake batch; its predictions reach the CPU and become a JSON-ready result;
its evaluator scores them), so a kind is added in one place."""
import json
import typing

import numpy as np
import pytest
import torch

from mthl_ds.config import DatasetConfig, load_recipe
from mthl_ds.geometry import CANVAS_TASKS, input_shape
from mthl_ds.tasks import TASKS, fake_batch, task_spec

CHANNELS = [16, 32, 64, 128]


def test_the_registry_holds_every_kind_a_recipe_accepts():
    kinds = set(typing.get_args(typing.get_type_hints(DatasetConfig)["task"]))
    assert set(TASKS) == kinds and CANVAS_TASKS <= kinds
    assert all(spec.kind == kind for kind, spec in TASKS.items())
    with pytest.raises(ValueError, match="unknown task 'depth'.*classification"):
        task_spec("depth")


@pytest.mark.parametrize("kind", sorted(TASKS))
def test_a_kind_builds_learns_predicts_and_scores_through_its_spec(kind):
    spec = task_spec(kind)
    recipe = load_recipe("demo")
    name = next(n for n, d in recipe.datasets.items() if d.task == kind)
    d = recipe.datasets[name]
    batch = fake_batch(recipe, name, seed=1, batch_size=2)
    assert batch["image"].shape == (2, 3, *input_shape(kind, d.size))
    assert batch.keys() - {"image"} == {"classification": {"label"}, "detection": {"boxes", "labels"},
                                        "segmentation": {"mask"}}[kind]
    head = spec.build_head(CHANNELS, DatasetConfig(kind, num_classes=d.num_classes, head_channels=32))
    h, w = batch["image"].shape[-2:]
    features = [torch.randn(2, c, h // s, w // s) for c, s in zip(CHANNELS, (4, 8, 16, 32))]
    loss, _ = head.train().loss(head(features), batch)
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())

    head.eval()
    meta = {"valid": torch.ones(2, dtype=torch.bool), "scale": torch.ones(2), "orig_size": [(h, w)] * 2,
            "image_id": torch.arange(2)}
    with torch.no_grad():
        output = spec.output_to_cpu(head.predict(head(features), {**batch, **meta}))
    items = output if isinstance(output, list) else list(output)
    classes = [f"shape{i}" for i in range(d.num_classes)]
    results = [spec.prediction(item, classes) for item in items]
    assert len(results) == 2
    if kind == "segmentation":
        assert results[0]["mask"].shape == (h, w) and results[0]["mask"].dtype == np.uint8
    else:
        json.dumps(results)  # JSON-ready
        names = results[0]["names"] if kind == "detection" else [r["name"] for r in results[0]["top5"]]
        assert all(n in classes for n in names)

    if kind == "detection":  # its evaluator scores against a shard set's ground truth: tests/test_evaluation.py
        return
    evaluator = spec.make_evaluator(d.num_classes, None, None, "cpu")
    with torch.no_grad():
        evaluator.update(head.predict(head(features), batch), {**batch, **meta})
    result = evaluator.result(lambda t: t, lambda x: [x])
    assert evaluator.metric in result and 0 <= result[evaluator.metric] <= 100
    assert 0 < spec.chance_level(evaluator, d.num_classes, lambda t: t) < 100
    assert spec.protocol(None, None, False).startswith({"classification": "top-1", "segmentation": "mIoU"}[kind])

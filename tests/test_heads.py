"""Each head learns on its synthetic data (one process, the demo's debug backbone)."""
import statistics

import pytest
import torch

from conftest import demo_overrides
from mthl_ds.config import load_recipe
from mthl_ds.data.pipelines import DatasetLoader, make_decoder
from mthl_ds.data.reader import ShardSet
from mthl_ds.models.mthl import build_model
from mthl_ds.train import pipeline_config


@pytest.mark.parametrize("name,steps,lr", [("imagenet", 40, 1e-3), ("coco", 60, 3e-4), ("ade20k", 25, 1e-3)])
def test_head_loss_decreases(shards, name, steps, lr):
    recipe = load_recipe("demo", demo_overrides(shards, ep_size=1))
    model = build_model(recipe)
    model.train()
    loader = DatasetLoader(ShardSet.open(shards / name / "train"), make_decoder(pipeline_config(recipe, name), True),
                           batch_size=8 if name == "imagenet" else 4, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.set_dataset(name)
    losses = []
    for _ in range(steps):
        batch = next(loader)
        loss, parts = model.heads[name].loss(model(batch["image"]), batch)
        assert torch.isfinite(loss) and parts
        optimizer.zero_grad()
        (loss + model.backbone.router_loss()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
    # medians: RetinaNet's focal loss spikes now and then early in training
    first, last = statistics.median(losses[:8]), statistics.median(losses[-8:])
    assert last < 0.8 * first, (name, [round(v, 2) for v in losses])

"""2-rank worker: an untrained demo model with expert parallelism 2 in eval mode. Evaluates the val sets at the
recipe's eval batch sizes and at batch 1, and runs fixed images inside batches of other content on each rank.
Rank 0 writes the metrics; every rank writes its outputs."""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from conftest import demo_overrides  # noqa: E402

from mthl_ds.build import build_model  # noqa: E402
from mthl_ds.config import load_recipe  # noqa: E402
from mthl_ds.evaluate import evaluate  # noqa: E402
from mthl_ds.runtime.collectives import all_gather_objects, all_reduce_sum, world  # noqa: E402
from mthl_ds.runtime.engine import build_engine, ep_rank, init_distributed  # noqa: E402
from mthl_ds.train import open_shards  # noqa: E402

EVAL_OVERRIDES = ["train.ds_config=stage0_fp32.json"]
BATCH_1 = [f"datasets.{n}.eval_batch_size=1" for n in ("imagenet", "coco", "ade20k")]


def prepare(model):
    """An untrained detector that keeps its boxes (so mAP is not trivially 0), with class weights drawn wide enough
    that its scores are not near-ties. With the head's own init (std 0.01) every score sits by the prior, and
    rounding that differs with the batch's shape reordered enough of them to move AP50 by 0.06 points. The
    segmentation classifier likewise: at mmseg's init (std 0.01) bf16 flips 1% of an untrained model's labels;
    drawn at PyTorch's default spread (about 3x wider), none."""
    head = model.heads["coco"]
    head.score_thresh = 0.0
    cls_logits = head.head.classification_head.cls_logits
    with torch.no_grad():
        cls_logits.weight.copy_(torch.randn(cls_logits.weight.shape, generator=torch.Generator().manual_seed(0)))
        if "ade20k" in model.heads:
            torch.nn.init.kaiming_uniform_(model.heads["ade20k"].classifier.weight, a=5 ** 0.5,
                                           generator=torch.Generator().manual_seed(0))
    model.eval()
    return model


def fixed_images(name: str, size: int) -> torch.Tensor:
    return torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(len(name)))


def head_outputs(output) -> torch.Tensor:
    """Every raw output of a head per image, flattened: logits, or box scores and deltas."""
    if isinstance(output, torch.Tensor):
        return output.flatten(1)
    return torch.cat([output[k].flatten(1) for k in ("cls_logits", "bbox_regression", "logits") if k in output], 1)


@torch.no_grad()
def outputs_in_batches(engine, recipe, rank: int) -> dict:
    """The fixed images, each placed among random images that differ per rank and in number."""
    out = {}
    for name, d in recipe.datasets.items():
        size = d.size[0]
        images = fixed_images(name, size)
        others = torch.randn(2 + 3 * rank, 3, size, size, generator=torch.Generator().manual_seed(100 + rank))
        batch = torch.cat([others[:1], images, others[1:]])
        engine.module.set_dataset(name)
        out[name] = head_outputs(engine(batch))[1:4]
    return out


def main(shards: Path, out: Path) -> None:
    recipe = load_recipe("demo", demo_overrides(shards) + EVAL_OVERRIDES)
    sets = open_shards(recipe, 2)
    init_distributed()
    rank, size = world()
    engine, _, _ = build_engine(build_model(recipe, ep_size=2, ep_rank=ep_rank(2)), recipe)
    prepare(engine.module)
    val = {n: v for n, (_, v) in sets.items()}
    results = {"recipe_batch": evaluate(engine, engine.module, recipe.datasets, val, rank, size, workers=1,
                                        reduce_sum=all_reduce_sum, gather=all_gather_objects),
               "batch_1": evaluate(engine, engine.module,
                                   load_recipe("demo", demo_overrides(shards) + BATCH_1).datasets,
                                   val, rank, size, reduce_sum=all_reduce_sum, gather=all_gather_objects)}
    torch.save(outputs_in_batches(engine, recipe, rank), out.parent / f"outputs_rank{rank}.pt")
    if rank == 0:
        out.write_text(json.dumps(results))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))

"""2-rank worker: evaluate an untrained demo model with expert parallelism 2; rank 0 writes the metrics."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from conftest import demo_overrides  # noqa: E402

from mthl_ds.config import load_recipe  # noqa: E402
from mthl_ds.engine import build_engine, ep_rank, init_distributed, world  # noqa: E402
from mthl_ds.models.mthl import build_model  # noqa: E402
from mthl_ds.train import evaluate, open_shards  # noqa: E402

EVAL_OVERRIDES = ["model.moe.drop_tokens=false", "train.ds_config=stage0_fp32.json"]


def prepare(model):
    model.heads["coco"].score_thresh = 0.0  # an untrained detector: keep its boxes so mAP is not trivially 0
    model.eval()
    return model


def main(shards: Path, out: Path) -> None:
    recipe = load_recipe("demo", demo_overrides(shards) + EVAL_OVERRIDES)
    sets = open_shards(recipe, 2)
    init_distributed()
    rank, size = world()
    engine, _, _ = build_engine(build_model(recipe, ep_size=2, ep_rank=ep_rank(2)), recipe)
    prepare(engine.module)
    results = evaluate(engine, engine.module, recipe, {n: v for n, (_, v) in sets.items()}, rank, size, workers=1)
    if rank == 0:
        out.write_text(json.dumps(results))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))

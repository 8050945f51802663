"""2-rank worker for export tests.

``train RUN_DIR OUT``: a few demo steps with ep_size 2 under ZeRO 2, checkpointed; then the engine's outputs on
fixed inputs for every dataset (rank 0 saves them). ``load MODEL OUT``: the export loaded for ep_size 1 and 2,
each wrapped in a DeepSpeed engine; rank 0 saves both engines' outputs.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from conftest import demo_overrides  # noqa: E402

from mthl_ds.artifacts.export import load_export  # noqa: E402
from mthl_ds.config import load_recipe  # noqa: E402
from mthl_ds.runtime.collectives import world  # noqa: E402
from mthl_ds.runtime.engine import build_engine, ep_rank, init_distributed  # noqa: E402
from mthl_ds.train import Trainer  # noqa: E402

SIZES = {"imagenet": (64, 64), "coco": (128, 128), "ade20k": (64, 64)}


def fixed_inputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return {name: torch.randn(2, 3, *size, generator=gen) for name, size in SIZES.items()}


def tensors(output) -> list[torch.Tensor]:
    """Every tensor in a head's output (a tensor, or dicts and lists of them), in a fixed order."""
    if isinstance(output, torch.Tensor):
        return [output.detach()]
    if isinstance(output, dict):
        return [t for k in sorted(output) for t in tensors(output[k])]
    return [t for item in output for t in tensors(item)]


@torch.no_grad()
def outputs(forward, model) -> dict[str, list[torch.Tensor]]:
    model.eval()
    result = {}
    for name, x in fixed_inputs().items():
        model.set_dataset(name)
        result[name] = tensors(forward(x))
    return result


def train(shards: Path, run_dir: Path, out: Path) -> None:
    recipe = load_recipe("demo", demo_overrides(shards, steps=4, ep_size=2, ds_config="zero2_fp32.json"))
    trainer = Trainer(recipe, run_dir)
    trainer.run()
    result = outputs(trainer.engine, trainer.model)
    if world()[0] == 0:
        torch.save(result, out)


def load(shards: Path, model_file: Path, out: Path) -> None:
    result = {}
    for ep_size in (1, 2):
        recipe = load_recipe("demo", demo_overrides(shards, ep_size=ep_size, ds_config="zero2_fp32.json"))
        init_distributed()
        model, _ = load_export(model_file, ep_size=ep_size, ep_rank=ep_rank(ep_size))
        engine, _, _ = build_engine(model, recipe)
        result[ep_size] = outputs(engine, engine.module)
    if world()[0] == 0:
        torch.save(result, out)


if __name__ == "__main__":
    mode, shards, path, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
    {"train": train, "load": load}[mode](shards, path, out)

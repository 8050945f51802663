"""2-rank worker for trainer tests. ``zero``: AdamW under ZeRO 0, 1 and 2; ``nonfinite``: a NaN loss on one
rank under both policies. Rank 0 writes a JSON summary."""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from conftest import demo_overrides  # noqa: E402

from mthl_ds.config import load_recipe  # noqa: E402
from mthl_ds.runtime.collectives import all_gather_objects  # noqa: E402
from mthl_ds.train import NonFiniteLoss, Trainer  # noqa: E402


class NanOnRank1(Trainer):
    """Rank 1 alone sees a NaN loss at step 3."""

    def nonfinite_ranks(self, loss):
        if self.step == 3 and self.rank == 1:
            loss = loss * float("nan")
        return super().nonfinite_ranks(loss)


def zero(shards: Path, out: Path) -> dict:
    losses = {}
    for cfg in ("stage0_fp32.json", "zero1_fp32.json", "zero2_fp32.json"):
        recipe = load_recipe("demo", demo_overrides(shards, steps=6, optimizer="adamw", lr=0.0005, ds_config=cfg))
        trainer = Trainer(recipe, out / cfg)
        trainer.run()
        losses[cfg] = [h["loss"] for h in trainer.history]
    return losses


def nonfinite(shards: Path, out: Path) -> dict:
    summary = {}
    trainer = NanOnRank1(load_recipe("demo", demo_overrides(shards, steps=5)), out / "skip")
    trainer.run()
    param = next(p for n, p in trainer.model.named_parameters() if "patch_embed" in n)
    summary["skip"] = {"skipped": [h["step"] for h in trainer.history if h.get("skipped")],
                       "finite": bool(all(torch.isfinite(p).all() for p in trainer.model.parameters())),
                       "same_on_ranks": all(torch.equal(x, param.detach()) for x in all_gather_objects(param.detach()))}
    try:
        NanOnRank1(load_recipe("demo", demo_overrides(shards, steps=5, nonfinite="stop")), out / "stop").run()
        summary["stop"] = all_gather_objects("no error")
    except NonFiniteLoss as e:
        summary["stop"] = all_gather_objects(str(e))
    return summary


if __name__ == "__main__":
    mode, shards, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    result = {"zero": zero, "nonfinite": nonfinite}[mode](shards, out)
    if torch.distributed.get_rank() == 0:
        (out / "summary.json").write_text(json.dumps(result))

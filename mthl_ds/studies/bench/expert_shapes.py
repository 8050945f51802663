"""Whether the looped experts' matmuls pay for row counts that change at every step, and what padding them to a
few sizes (:func:`mthl_ds.moe.grouped.padded_count`) buys back. Forward plus backward of 12 expert MLPs
(hidden 4 d / K, K = 4) on K x S rows, against the dense ``Mlp(d, 4 d)`` on S rows:

- ``fixed``: the same counts at every call;
- ``new``: new counts at every call (each expert's share drawn between 0.5 and 1.5 of the mean), rows as they are;
- ``padded``: new counts at every call through ``run_groups`` (the layer's looped path, which pads where
  ``padded_count`` says so: the CPU in bf16 / fp16).

Each is warmed up with 10 calls, then timed alternately with the dense MLP (``side_by_side``), the median ratio
of 11. Run as
``python -m mthl_ds.studies.bench.expert_shapes bfloat16 96x25088 384x1568 768x392`` (dtype, then width x rows;
those are the ImageNet batch-8 stage shapes of Swin-T's widths 96, 384 and 768).
"""
from __future__ import annotations

import argparse

import torch
from timm.layers import Mlp

from mthl_ds.moe.grouped import run_groups
from mthl_ds.runtime.host_memory import keep_freed_blocks
from mthl_ds.studies.bench.common import side_by_side

EXPERTS, TOP_K = 12, 4


def new_counts(rows: int, generator: torch.Generator) -> list[int]:
    share = torch.rand(EXPERTS, generator=generator) + 0.5
    counts = (share / share.sum() * rows).long()
    counts[0] += rows - counts.sum()
    return counts.tolist()


def measure(dtype: torch.dtype, width: int, tokens: int) -> dict[str, float]:
    """Milliseconds of the dense MLP, and the three expert cases as ratios to it."""
    generator = torch.Generator().manual_seed(0)
    dense = Mlp(width, 4 * width).to(dtype)
    experts = [Mlp(width, 4 * width // TOP_K).to(dtype) for _ in range(EXPERTS)]
    x = torch.randn(tokens, width, dtype=dtype, requires_grad=True)
    rows = torch.randn(TOP_K * tokens, width, dtype=dtype, requires_grad=True)
    fixed = new_counts(len(rows), generator)

    def unpadded(counts: list[int]) -> None:
        torch.cat([m(part) for m, part in zip(experts, rows.split(counts))]).float().sum().backward()

    def padded() -> None:
        run_groups(experts, rows, torch.tensor(new_counts(len(rows), generator)), "looped").float().sum().backward()

    def dense_step() -> None:
        dense(x).float().sum().backward()

    cases = {"fixed": lambda: unpadded(fixed), "new": lambda: unpadded(new_counts(len(rows), generator)),
             "padded": padded}
    ratios = {name: side_by_side(call, dense_step, repeats=11, warmup=10) for name, call in cases.items()}
    return {"dense_ms": ratios["fixed"]["baseline_s"] * 1e3, **{n: r["ratio_median"] for n, r in ratios.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dtype", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("shapes", nargs="+", help="WIDTHxROWS, e.g. 384x1568")
    args = parser.parse_args()
    keep_freed_blocks()  # as mthl-ds bench does
    print("| dtype | width | rows | dense ms | fixed | new | padded |\n|---|---|---|---|---|---|---|")
    for shape in args.shapes:
        width, tokens = map(int, shape.lower().split("x"))
        r = measure(getattr(torch, args.dtype), width, tokens)
        print(f"| {args.dtype} | {width} | {tokens} | {r['dense_ms']:.1f} | {r['fixed']:.2f} | {r['new']:.2f} | "
              f"{r['padded']:.2f} |", flush=True)


if __name__ == "__main__":
    main()

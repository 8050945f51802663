"""The ``mthl-ds`` command."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from mthl_ds.config import ConfigError, list_recipes, load_recipe
from mthl_ds.data.shards import ShardError


def cmd_recipes(args) -> int:
    for name in list_recipes():
        print(f"{name:<16} {load_recipe(name).description}")
    return 0


def cmd_model_info(args) -> int:
    from mthl_ds.model_info import format_info, model_info
    recipe = load_recipe(args.recipe, args.set)
    info = model_info(recipe)
    print(json.dumps(info, indent=2) if args.json else format_info(recipe.name, info))
    return 0


def cmd_demo(args) -> int:
    from mthl_ds.demo import run_demo
    return run_demo(args.out, overrides=tuple(args.set))


def cmd_synth(args) -> int:
    from mthl_ds.data.synth import write_world
    roots = write_world(args.out, seed=args.seed, scale=args.scale)
    for name, root in roots.items():
        print(f"{name:<10} {root}")
    return 0


def cmd_shards(args) -> int:
    from mthl_ds.data.shards import convert
    index = convert(args.kind, args.out, split=args.split, shard_size=args.shard_size, workers=args.workers,
                    root=args.root, images=args.images, annotations=args.annotations, labels=args.labels,
                    num_classes=args.num_classes, name=args.name, force=args.force)
    print(f"{args.out}: {index['num_samples']} samples in {len(index['shards'])} shards, "
          f"{index['skipped']} skipped")
    return 0


def cmd_bench(args) -> int:
    from mthl_ds.bench.common import markdown_table
    if args.suite == "data":
        from mthl_ds.bench.data import run
        rows = run(count=args.count, repeats=args.repeats)
        columns = ["benchmark", "candidate", "baseline", "ratio (throughput)", "target"]
    else:
        from mthl_ds.bench.lamb import run
        rows = run(repeats=args.repeats)
        columns = ["benchmark", "candidate", "median_ms", "spread_ms"]
    table = markdown_table(rows, columns)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"bench_{args.suite}.json").write_text(json.dumps(rows, indent=1))
        (args.out / f"bench_{args.suite}.md").write_text(table + "\n")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mthl-ds", description="Multi-task heterogeneous learners on DeepSpeed-MoE")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("recipes", help="list the recipes")
    p.set_defaults(fn=cmd_recipes)
    p = sub.add_parser("model-info", help="parameters and FLOPs of a recipe's model and its dense twin")
    p.add_argument("recipe")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe value")
    p.set_defaults(fn=cmd_model_info)
    p = sub.add_parser("demo", help="synthetic world -> shards -> 2-rank training (ZeRO 2, LAMB, ep 2) -> report")
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(fn=cmd_demo)
    p = sub.add_parser("synth", help="write the synthetic world in the datasets' real layouts")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=1.0, help="multiply every image count")
    p.set_defaults(fn=cmd_synth)
    p = sub.add_parser("shards", help="convert a dataset split from its own layout to WebDataset shards")
    p.add_argument("kind", choices=["imagenet", "coco", "ade20k"])
    p.add_argument("--out", type=Path, required=True, help="the shard-set folder to write")
    p.add_argument("--split", required=True, help="imagenet: train|val; coco: a name; ade20k: training|validation")
    p.add_argument("--root", type=Path, help="imagenet: the ILSVRC root (train/, val/); ade20k: ADEChallengeData2016")
    p.add_argument("--images", type=Path, help="coco: the images folder")
    p.add_argument("--annotations", type=Path, help="coco: instances_*.json")
    p.add_argument("--labels", type=Path, help="imagenet flat val: label file (default ROOT/LOC_val_solution.csv)")
    p.add_argument("--num-classes", type=int, help="ade20k: label count (default: objectInfo150.csv, else 150)")
    p.add_argument("--name", help="dataset name recorded in the index")
    p.add_argument("--shard-size", type=int, default=256, help="samples per shard")
    p.add_argument("--workers", type=int, default=1, help="parallel writer processes")
    p.add_argument("--force", action="store_true", help="replace an existing shard set (only once the new one is complete)")
    p.set_defaults(fn=cmd_shards)
    p = sub.add_parser("bench", help="benchmarks that print their figures")
    p.add_argument("suite", choices=["data", "lamb"])
    p.add_argument("--count", type=int, default=400, help="samples per timed loop")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, help="also write JSON + markdown here")
    p.set_defaults(fn=cmd_bench)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.fn(args)
    except ConfigError as e:
        print(f"mthl-ds: config error: {e}", file=sys.stderr)
        return 2
    except ShardError as e:
        print(f"mthl-ds: data error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

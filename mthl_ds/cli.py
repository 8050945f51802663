"""The ``mthl-ds`` command."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mthl_ds.config import ConfigError, list_recipes, load_recipe


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
    from mthl_ds.demo import launch
    load_recipe("demo", args.set)  # refuse a bad override before starting any process
    rc = launch(args.out, overrides=tuple(args.set))
    if rc == 0:
        print(f"demo finished: metrics in {args.out / 'final_metrics.json'}")
    return rc


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
    p = sub.add_parser("demo", help="the embedded demo: 2 CPU ranks, ZeRO 2, expert parallelism 2")
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(fn=cmd_demo)
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except ConfigError as e:
        print(f"mthl-ds: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""The ``mthl-ds`` command."""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

from mthl_ds.adapt_modes import MODES
from mthl_ds.config import ConfigError, list_recipes, load_recipe
from mthl_ds.data.shards import ShardError
from mthl_ds.errors import CheckpointError, ExportError, InputError


class UsageError(ValueError):
    """Options that do not fit together; the message names them."""


EXIT_SOME_INPUTS_FAILED = 1  # predict: some images could not be read; every other image has its result


def cmd_recipes(args) -> int:
    for name in list_recipes():
        print(f"{name:<16} {load_recipe(name).description}")
    return 0


def cmd_model_info(args) -> int:
    from mthl_ds.studies.model_info import format_info, model_info
    recipe = load_recipe(args.recipe, args.set)
    if args.memory:
        from mthl_ds.studies.memory import format_plan, plan_recipe
        plan = plan_recipe(recipe, args.gpus, [float(g) for g in args.gpu_memory.split(",")],
                           progress=(lambda _: None) if args.json else print)
        print(json.dumps(plan, indent=2) if args.json else format_plan(plan))
        return 0
    info = model_info(recipe)
    print(json.dumps(info, indent=2) if args.json else format_info(recipe.name, info))
    return 0


def cmd_train(args) -> int:
    from mthl_ds.train import main as train_main
    return train_main(args.train_args)


def cmd_demo(args) -> int:
    from mthl_ds.studies.demo import run_demo
    return run_demo(args.out, overrides=tuple(args.set), recipe=args.recipe)


def cmd_stability(args) -> int:
    from mthl_ds.studies.stability import run_stability
    run_stability(args.out, args.seeds, args.recipe, tuple(args.set))
    return 0


def cmd_synth(args) -> int:
    from mthl_ds.studies.synth import write_world
    roots = write_world(args.out, seed=args.seed, scale=args.scale)
    for name, root in roots.items():
        print(f"{name:<10} {root}")
    return 0


def cmd_shards(args) -> int:
    from mthl_ds.data.convert import convert
    index = convert(args.kind, args.out, split=args.split, shard_size=args.shard_size, workers=args.workers,
                    root=args.root, images=args.images, annotations=args.annotations, labels=args.labels,
                    num_classes=args.num_classes, name=args.name, force=args.force, masks=args.masks,
                    classes=args.classes, ignore_index=args.ignore_index, label_map=args.label_map, year=args.year,
                    ap=args.ap)
    print(f"{args.out}: {index['num_samples']} samples in {len(index['shards'])} shards, "
          f"{index['skipped']} skipped")
    return 0


def cmd_bench(args) -> int:
    from mthl_ds.runtime.host_memory import keep_freed_blocks
    from mthl_ds.studies.bench.common import markdown_table
    if not args.system_malloc:  # time the compute, not the kernel faulting in each step's large blocks again
        keep_freed_blocks()
    if args.suite == "all":
        from mthl_ds.studies.bench.suite import COLUMNS, run
        only = set(args.only.split(",")) if args.only else None
        rows = run(smoke=args.smoke, repeats=args.repeats, only=only)
        columns = COLUMNS
        import torch
        if torch.cuda.is_available() and (only is None or "GPU" in only):
            from mthl_ds.studies.bench.gpu import gpu_rows
            rows += gpu_rows(repeats=args.repeats)
    elif args.suite == "data" and args.real_size:
        from mthl_ds.studies.bench.data import run_real_size
        rows = run_real_size(args.recipe, count=min(args.count, 48), repeats=args.repeats)
        columns = ["benchmark", "images_per_s_per_worker", "batch", "v100_step_s", "images_per_s_needed",
                   "workers_per_gpu", "source"]
    elif args.suite == "data":
        from mthl_ds.studies.bench.data import run
        rows = run(count=args.count, repeats=args.repeats)
        columns = ["benchmark", "candidate", "baseline", "ratio (throughput)", "target"]
    elif args.suite == "gpu":
        import torch

        from mthl_ds.studies.bench.gpu import gpu_rows
        from mthl_ds.studies.bench.suite import COLUMNS
        if not torch.cuda.is_available():
            raise InputError("mthl-ds bench gpu needs a CUDA GPU; torch.cuda.is_available() is False here")
        rows = gpu_rows(repeats=args.repeats)
        columns = COLUMNS
    elif args.suite == "moe":
        from mthl_ds.studies.bench.moe import COLUMNS as columns
        from mthl_ds.studies.bench.moe import run
        rows = run(repeats=args.repeats, scale=args.scale)
    elif args.suite == "step":
        from mthl_ds.studies.bench.step import COLUMNS as columns
        from mthl_ds.studies.bench.step import run
        precisions = tuple(args.precisions.split(",")) if args.precisions else ("fp32", "bf16")
        rows = run(args.recipe, precisions, repeats=args.repeats, batches=args.batches,
                   progress=lambda row: print(json.dumps(row)))
    elif args.suite == "launches":
        from mthl_ds.studies.bench.launches import COLUMNS as columns
        from mthl_ds.studies.bench.launches import run
        rows = run(args.recipe, tuple(args.precisions.split(",")) if args.precisions else ("bf16",), args.batches)
    elif args.suite == "large-image":
        from mthl_ds.studies.bench.large_image import run
        rows = run()
        columns = ["benchmark", "candidate", "peak_rss_gb", "seconds"]
    elif args.suite == "integrity":
        from mthl_ds.studies.bench.integrity import run
        rows = run(repeats=args.repeats)
        columns = ["benchmark", "candidate", "figure"]
    else:
        from mthl_ds.studies.bench.lamb import run
        rows = run(repeats=args.repeats)
        columns = ["benchmark", "candidate", "median_ms", "spread_ms"]
    table = markdown_table(rows, columns)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"bench_{args.suite}.json").write_text(json.dumps(rows, indent=1))
        (args.out / f"bench_{args.suite}.md").write_text(table + "\n")
    return 0


def cmd_rehearse(args) -> int:
    from mthl_ds.studies.rehearse import RehearsalError, rehearse
    try:
        rehearse(args.recipe, args.out or Path("runs") / f"rehearse_{Path(args.recipe).stem}_{args.precision}",
                 ranks=args.ranks, precision=args.precision, steps=args.steps, batch_size=args.batch_size,
                 overrides=tuple(args.set), dense=not args.no_dense)
    except RehearsalError as e:
        print(f"mthl-ds rehearse: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_evaluate(args) -> int:
    from mthl_ds.evaluate import run_evaluate
    summary = run_evaluate(args.model, args.data, args.split, dict(args.annotations or []), args.original,
                           args.batch_size, args.out, device=args.device)
    for name, r in summary["results"].items():
        print(f"{name:<12} {r['task']:<15} {r['metric']} {r['value']:.2f}  ({summary['protocol'][name]})")
    if args.out:
        print(args.out / "eval_metrics.json")
    return 0


def cmd_predict(args) -> int:
    from mthl_ds.predict import run_predict
    summary = run_predict(args.model, args.dataset, args.images, args.out, args.batch_size, args.draw_threshold,
                          device=args.device, precision=args.precision)
    print(f"{summary['images']} images in {summary['seconds']:.2f} s ({summary['images_per_s']:.1f} images/s); "
          f"results in {summary['out']}")
    for failure in summary["failed"]:
        print(f"mthl-ds predict: {failure['error']}", file=sys.stderr)
    if summary["failed"]:
        print(f"mthl-ds predict: {len(summary['failed'])} of {len(args.images)} images could not be read (error "
              f"records in predictions.json); the others have results", file=sys.stderr)
    return EXIT_SOME_INPUTS_FAILED if summary["failed"] else 0


def cmd_export(args) -> int:
    from mthl_ds.artifacts.checkpoint import tag_of
    from mthl_ds.artifacts.export import export_run, read_metadata
    if args.tag and args.step is not None:
        raise UsageError("give --tag or --step, not both")
    path = export_run(args.run_dir, args.out, tag_of(args.step) if args.step is not None else args.tag)
    meta = read_metadata(path)
    m = meta["model"]
    print(f"{path}: {m['parameters'] / 1e6:.2f}M parameters, {m['moe_layers']} MoE layers, experts "
          f"{m['experts_per_layer']}, heads {m['heads']} (from {meta['source']['tag']}, step {meta['source']['step']})")
    return 0


def cmd_verify(args) -> int:
    from mthl_ds.artifacts.checkpoint import verify_report
    rows, ok = verify_report(args.path)
    print(rows)
    return 0 if ok else 1


def data_arg(text: str) -> tuple[str, Path]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"{text!r}: use NAME=DIR")
    name, folder = text.split("=", 1)
    return name, Path(folder)


def batch_sizes(text: str) -> dict[str, int]:
    """``imagenet=64,coco=2`` -> ``{"imagenet": 64, "coco": 2}``."""
    sizes = {}
    for item in text.split(","):
        name, _, size = item.partition("=")
        if not name or not size.isdigit() or int(size) < 1:
            raise argparse.ArgumentTypeError(f"{item!r}: use NAME=BATCH with a positive batch, e.g. imagenet=64")
        sizes[name] = int(size)
    return sizes


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):  # also refuses nan
        raise argparse.ArgumentTypeError(f"{text!r}: use a positive number, e.g. 1 or 0.25")
    return value


def shard_set(folder: Path, split: str):
    """A shard set given directly, or a dataset folder's ``split``."""
    from mthl_ds.data.reader import INDEX, ShardSet
    return ShardSet.open(folder if (folder / INDEX).is_file() else folder / split)


def cmd_stats(args) -> int:
    from mthl_ds.analysis import stats
    from mthl_ds.artifacts.export import load_model
    from mthl_ds.runtime.device import resolve
    device = resolve(args.device)  # a device this machine lacks is refused before any work
    data = {name: shard_set(folder, args.split) for name, folder in args.data}
    pair = args.grad_cosine.split(",") if args.grad_cosine else []
    if args.grad_cosine and (len(pair) != 2 or not set(pair) <= set(data)):
        raise UsageError(f"--grad-cosine {args.grad_cosine!r}: name two of the --data sets {sorted(data)}, as A,B")
    model, label, _ = load_model(args.model)  # on the CPU, then moved
    model.to(device)
    layers = stats.gate_names(model)
    if args.maps and not -len(layers) <= args.map_layer < len(layers):
        raise UsageError(f"--map-layer {args.map_layer}: {args.model} has {len(layers)} routed layers {layers}")
    models = {label: model}
    for path in args.compare or []:  # every checkpoint loaded and checked before any work
        other, other_label, _ = load_model(path)
        models[other_label if other_label not in models else str(path)] = other.to(device)
        try:
            stats.same_layers(models)
        except ValueError as e:
            raise UsageError(f"--compare {path}: {e}") from None
    built = model.built_from
    sizes = {n: tuple(args.size or built["datasets"].get(n, {}).get("size") or (built["model"]["img_size"],) * 2)
             for n in data}
    written = stats.write_statistics(stats.routing_statistics(model, data, sizes, batch_size=args.batch_size,
                                                              max_images=args.max_images), args.out)
    if args.compare:
        result = stats.routing_convergence(models, data, sizes, args.batch_size, args.max_images or 64)
        written += stats.write_result(result, args.out, "hamming", stats.plot_convergence)
    if pair:
        result = stats.gradient_cosine(model, {n: data[n] for n in pair}, sizes, args.grad_batches,
                                       args.batch_size, args.grad_params)
        written += stats.write_result(result, args.out, "grad_cosine", stats.plot_gradient_cosine)
        print(f"gradient cosine {pair[0]} vs {pair[1]} on {result['parameters']} shared parameters: mean "
              f"{result['mean_overall']:.3f} over {len(result['batches'])} batch pairs")
    if args.maps:
        result = stats.expert_maps(model, data, sizes, args.maps, args.map_layer)
        stats.plot_expert_maps(result, args.out / "expert_maps.png")
        written.append(args.out / "expert_maps.png")
    for path in written:
        print(path)
    return 0


def new_dataset(args, name: str, folder: Path):
    from mthl_ds.adapt import NewDataset, source_size
    size = tuple(args.size) if args.size else source_size(args.model, folder)
    return NewDataset(name, folder, size, args.batch_size, args.head_channels)


def train_settings(args) -> dict:
    return {"steps": args.steps, "lr": args.lr, "warmup_steps": max(1, args.steps // 10), "workers": args.workers,
            "seed": args.seed}


def cmd_adapt(args) -> int:
    from mthl_ds.adapt import run_mode
    row = run_mode(args.model, new_dataset(args, args.dataset, args.data), args.mode, args.out, train_settings(args))
    print(json.dumps(row, indent=1))
    return 0


def cmd_expand(args) -> int:
    from mthl_ds.adapt import phase_recipe, run_phase
    recipe = phase_recipe(args.model, new_dataset(args, args.dataset, args.data), {"add_experts": args.add_experts},
                          None, train_settings(args), keep_datasets=True)
    results, export = run_phase(recipe, args.out)
    print(f"{export}: {args.dataset} {results[args.dataset]['metric']} {results[args.dataset]['value']:.2f}")
    return 0


def cmd_adapt_report(args) -> int:
    from mthl_ds.adapt import run_mode, write_table
    modes = args.modes or [m for m in MODES if "_used" not in m]
    rows = []
    for name, folder in args.data:
        for mode in modes:
            out = args.out / name / mode
            if (out / "result.json").is_file() and not args.force:
                rows.append(json.loads((out / "result.json").read_text()))
                continue
            if args.force:  # trained afresh: a run folder left there would be resumed at its last step instead
                shutil.rmtree(out, ignore_errors=True)
            try:
                rows.append(run_mode(args.model, new_dataset(args, name, folder), mode, out, train_settings(args)))
            except ConfigError as e:
                rows.append({"mode": mode, "dataset": name, "error": str(e)})
            print(f"adapt-report: {name} {mode}: {rows[-1].get('value', rows[-1].get('error'))}", flush=True)
    print(write_table(rows, args.out))
    return 0


def add_adapt_arguments(p) -> None:
    p.add_argument("--steps", type=int, default=300, help="training steps per phase")
    p.add_argument("--lr", type=float, default=0.002)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"),
                   help="input size (default: the size the model was trained at for the same task)")
    p.add_argument("--head-channels", type=int, default=0, help="detection/segmentation head width (0: mmdet/mmseg's)")
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers")
    p.add_argument("--seed", type=int, default=0)


def add_device_argument(p) -> None:
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: CUDA where there is one, else the CPU)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mthl-ds", description="Multi-task heterogeneous learners on DeepSpeed-MoE")
    # the deepspeed launcher's; LOCAL_RANK is read
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", add_help=False, help="train a recipe under whatever launcher started the process "
                       "(deepspeed, torchrun, srun, none): mthl-ds train --recipe NAME --out RUN_DIR "
                       "[--set KEY=VALUE]; see mthl-ds train --help")
    p.set_defaults(fn=cmd_train)
    p = sub.add_parser("recipes", help="list the recipes")
    p.set_defaults(fn=cmd_recipes)
    p = sub.add_parser("model-info", help="parameters and FLOPs of a recipe's model and its dense twin")
    p.add_argument("recipe")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe value")
    p.add_argument("--memory", action="store_true", help="per-GPU memory plan: states from the ZeRO layout, "
                   "activations measured at batch 1 and 2 at the real input sizes and extrapolated to the recipe's "
                   "batch")
    p.add_argument("--gpus", type=int, default=96, help="--memory: GPUs of the run")
    p.add_argument("--gpu-memory", default="16,32", metavar="GB,GB", help="--memory: card sizes to check")
    p.set_defaults(fn=cmd_model_info)
    p = sub.add_parser("demo", help="synthetic world -> shards -> 2-rank training (ZeRO 2, LAMB, ep 2) -> report")
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--recipe", default="demo", help="demo (MTHL), demo_adamv (AdaMV-MoE) or demo_modsquad (Mod-Squad)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(fn=cmd_demo)
    p = sub.add_parser("rehearse", help="a recipe's real model at its real input sizes and precision on CPU ranks: "
                                        "steps of every dataset, checkpoint, resume, export, evaluation, memory plan")
    p.add_argument("recipe")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--precision", choices=["fp16", "bf16", "fp32"], default="fp16")
    p.add_argument("--steps", type=int, default=0, help="steps per launch (default: one per dataset)")
    p.add_argument("--batch-size", type=int, default=1, help="per rank, every dataset")
    p.add_argument("--no-dense", action="store_true", help="skip the dense twin's step times")
    p.add_argument("--out", type=Path, help="default runs/rehearse_RECIPE_PRECISION")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(fn=cmd_rehearse)
    p = sub.add_parser("stability", help="the demo with several seeds: each dataset's metric mean +- std and its "
                                         "worst loss excursion (20-step moving average over its running minimum)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--recipe", default="demo")
    p.add_argument("--out", type=Path, default=Path("runs/stability"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(fn=cmd_stability)
    p = sub.add_parser("synth", help="write the synthetic world in the datasets' real layouts")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=1.0, help="multiply every image count")
    p.set_defaults(fn=cmd_synth)
    p = sub.add_parser("shards", help="convert a dataset split from its own layout to WebDataset shards")
    p.add_argument("kind", choices=["imagenet", "coco", "ade20k", "imagefolder", "pets", "cub", "cars", "places365",
                                    "inat2018", "voc", "cityscapes", "nyu", "masks"])
    p.add_argument("--out", type=Path, required=True, help="the shard-set folder to write")
    p.add_argument("--split", required=True, help="imagenet: train|val; coco, imagefolder, masks: a name; ade20k: "
                   "training|validation; pets: trainval|test; cub, cars: train|test; places365, inat2018: train|val; "
                   "voc: ImageSets/Main/<split>.txt; cityscapes: train|val|test; nyu: the images/ sub-folder")
    p.add_argument("--root", type=Path, help="imagenet: the ILSVRC root (train/, val/); ade20k: ADEChallengeData2016; "
                   "imagefolder: the folder of class folders; pets: oxford-iiit-pet; cub: CUB_200_2011; cars: "
                   "stanford_cars; places365: the folder of its lists; inat2018: the folder of its JSON; voc: the "
                   "folder holding VOCdevkit; cityscapes: the folder holding leftImg8bit and gtFine; nyu: the folder "
                   "holding images/ and annotations/")
    p.add_argument("--images", type=Path, help="coco, masks: the images folder")
    p.add_argument("--masks", type=Path, help="masks: the folder of 8-bit PNG label maps (same names as the images)")
    p.add_argument("--annotations", type=Path, help="coco: instances_*.json")
    p.add_argument("--labels", type=Path, help="imagenet flat val: label file (default ROOT/LOC_val_solution.csv)")
    p.add_argument("--num-classes", type=int, help="ade20k: label count (default: objectInfo150.csv, else 150); "
                   "masks: class count (or --classes)")
    p.add_argument("--classes", type=Path, help="masks: class names, one per line")
    p.add_argument("--ignore-index", type=int, default=255, help="masks: the mask value that is no class (255)")
    p.add_argument("--label-map", type=Path, help='masks: JSON {"stored value": class id}; others become ignored')
    p.add_argument("--year", default="2007", help="voc: the VOC<year> folder under VOCdevkit (2007)")
    p.add_argument("--ap", choices=["11point", "area"], help="voc: AP method (default: 11point for 2007, else area)")
    p.add_argument("--name", help="dataset name recorded in the index")
    p.add_argument("--shard-size", type=int, default=256, help="samples per shard")
    p.add_argument("--workers", type=int, default=1, help="parallel writer processes")
    p.add_argument(
    "--force",
    action="store_true",
     help="replace an existing shard set (only once the new one is complete)")
    p.set_defaults(fn=cmd_shards)
    p = sub.add_parser("bench", help="benchmarks that print their figures")
    p.add_argument("suite", nargs="?", default="all",
                   choices=["all", "data", "lamb", "gpu", "integrity", "large-image", "launches", "moe", "step"],
                   help="all: the suite B1-B8 (+ the G rows with CUDA); data / lamb / gpu / integrity / large-image / "
                        "launches / moe: one benchmark in detail (gpu: CUDA only; integrity: checksum, manifest and "
                        "export-checksum costs; large-image: peak memory of predicting a 6000x4000 photo's "
                        "segmentation; launches: the kernels one ImageNet step launches, per phase, through the "
                        "trainer (MTHL.D, MTHL capacity / dropless) against a bare timm Swin-T loop, countable "
                        "without a GPU; moe: one MoE layer, capacity / dropless / DeepSpeed's / dense, at the "
                        "Swin-T stage widths and the paper's per-GPU tokens; step: MTHL (capacity and dropless) "
                        "against MTHL.D, one training forward and backward per dataset at the recipe's input sizes)")
    p.add_argument("--only", help="suite: comma-separated ids to run (B1,...,B8; GPU: the G rows, with CUDA)")
    p.add_argument("--smoke", action="store_true", help="suite: tiny sizes, 2 repeats (checks the code, not the speed)")
    p.add_argument("--count", type=int, default=400, help="samples per timed loop")
    p.add_argument("--real-size", action="store_true", help="data: each dataset at the recipe's real sizes and "
                   "augmentations, and the workers per GPU that feed a V100 (at most 48 samples per loop)")
    p.add_argument("--recipe", default="mthl_swin_t",
                   help="data --real-size, step, launches: the recipe whose datasets to time")
    p.add_argument("--precisions", help="step: comma-separated, of fp32, bf16, fp16 (default fp32,bf16); launches: of "
                   "bf16, fp16 (default bf16)")
    p.add_argument("--batches", type=batch_sizes,
                   help="step, launches: batch size per dataset, e.g. imagenet=64,coco=2,ade20k=2 (the paper's "
                        "per-GPU batches, the default with CUDA; on the CPU step's default is imagenet=8,coco=1,"
                        "ade20k=2, launches' imagenet=2,coco=1,ade20k=2)")
    p.add_argument("--scale", type=positive_float,
                   help="moe: multiply the paper's per-GPU token counts (default 1 with CUDA, 1/4 on the CPU)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--system-malloc", action="store_true",
                   help="keep the C library's defaults, which unmap large freed blocks (by default a bench process "
                        "keeps them for reuse, as a GPU's caching allocator does: runtime/host_memory.py)")
    p.add_argument("--out", type=Path, help="also write JSON + markdown here")
    p.set_defaults(fn=cmd_bench)
    p = sub.add_parser("export", help="consolidate a run's DeepSpeed checkpoint into one safetensors file")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tag", help="checkpoint tag (default: the latest complete one)")
    p.add_argument("--step", type=int, help="the checkpoint of this step (e.g. the newest one that verifies)")
    p.set_defaults(fn=cmd_export)
    p = sub.add_parser("verify", help="check a run's checkpoints (or one checkpoint) against their manifests: a table "
                                      "of step, files, bytes, ok or what is wrong; exit 1 if any is damaged")
    p.add_argument("path", type=Path, help="a run folder, its checkpoints/ folder or one checkpoint folder")
    p.set_defaults(fn=cmd_verify)
    p = sub.add_parser("evaluate", help="every metric of an export, run folder or checkpoint on val shards "
                                        "(JSON + markdown report)")
    p.add_argument("model", type=Path)
    p.add_argument("--data", type=data_arg, action="append", required=True, metavar="NAME=DIR",
                   help="a shard set, or a dataset folder holding the --split (repeatable)")
    p.add_argument("--split", default="val")
    p.add_argument("--annotations", type=data_arg, action="append", metavar="NAME=FILE",
                   help="detection: score against this COCO instances_*.json instead of the shards' ground truth")
    p.add_argument("--original", action="store_true",
                   help="segmentation: score at the original resolution (mmseg) instead of the canvas scale")
    p.add_argument("--batch-size", type=int, default=0, help="default: the dataset's eval batch size")
    p.add_argument("--out", type=Path)
    add_device_argument(p)
    p.set_defaults(fn=cmd_evaluate)
    p = sub.add_parser("predict", help="predict on image files: top-5 (classification), boxes (detection), masks "
                                       "(segmentation); JSON, drawings and overlays. An image that cannot be read "
                                       "gets an error record, the others their results, and the exit code is 1")
    p.add_argument("model", type=Path, help="an export file, a run folder or RUN/checkpoints/TAG")
    p.add_argument("images", type=Path, nargs="+")
    p.add_argument("--dataset", required=True, help="which of the model's datasets (router and head) to use")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--draw-threshold", type=float, default=0.3, help="detection: draw boxes scoring at least this")
    add_device_argument(p)
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="bf16 / fp16: the model under autocast (fp16 is refused on the CPU)")
    p.set_defaults(fn=cmd_predict)
    p = sub.add_parser("stats", help="routing analysis of a model on data: usage, router similarity, and on request "
                                     "routing convergence, gradient conflict, expert maps (JSON + plots)")
    p.add_argument("model", type=Path, help="an export file, a run folder or a checkpoint folder RUN/checkpoints/TAG")
    p.add_argument("--data", type=data_arg, action="append", required=True, metavar="NAME=DIR",
                   help="a shard set, or a dataset folder holding train/ and val/ (repeatable)")
    p.add_argument("--split", default="train", help="split read from a dataset folder")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="input size (default: the dataset's)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-images", type=int, help="images per dataset (default: all; --compare: 64)")
    p.add_argument("--compare", type=Path, nargs="+", metavar="MODEL",
                   help="routing convergence: Hamming distances between the routing of MODEL and these (checkpoints)")
    p.add_argument("--grad-cosine", metavar="A,B", help="cosine of two datasets' loss gradients on shared parameters")
    p.add_argument("--grad-batches", type=int, default=8, help="--grad-cosine: batch pairs")
    p.add_argument("--grad-params", metavar="REGEX", help="--grad-cosine: only shared parameters matching this")
    p.add_argument("--maps", type=int, default=0, metavar="N", help="draw N images per dataset with their patches' "
                   "top-1 (border) and top-2 (fill) experts")
    p.add_argument("--map-layer", type=int, default=-1, help="--maps: index of the gate (MoE MLPs, then attention)")
    p.add_argument("--out", type=Path, required=True)
    add_device_argument(p)
    p.set_defaults(fn=cmd_stats)
    p = sub.add_parser("adapt", help="adapt an exported model to a new dataset (one Table-3 mode)")
    p.add_argument("model", type=Path)
    p.add_argument("--data", type=Path, required=True, help="the new dataset's folder (train/ and val/ shard sets)")
    p.add_argument("--dataset", required=True, help="its name (a new router and head)")
    p.add_argument("--mode", default="routers", choices=list(MODES))
    p.add_argument("--out", type=Path, required=True)
    add_adapt_arguments(p)
    p.set_defaults(fn=cmd_adapt)
    p = sub.add_parser("expand", help="continual learning: add experts and a router for a new dataset, train only them")
    p.add_argument("model", type=Path)
    p.add_argument("--add-experts", type=int, required=True, metavar="C")
    p.add_argument("--dataset", required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    add_adapt_arguments(p)
    p.set_defaults(fn=cmd_expand)
    p = sub.add_parser("adapt-report", help="Table 3: every adaptation mode on new datasets, markdown + trade-off plot")
    p.add_argument("model", type=Path)
    p.add_argument("--data", type=data_arg, action="append", required=True, metavar="NAME=DIR")
    p.add_argument("--modes", nargs="*", help="default: all but the Table-A1 selection variants")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--force", action="store_true", help="re-run modes that already have a result")
    add_adapt_arguments(p)
    p.set_defaults(fn=cmd_adapt_report)
    args, rest = parser.parse_known_args(argv)
    if args.command == "train":
        args.train_args = rest  # parsed by mthl_ds.train, which documents them
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.fn(args)
    except ConfigError as e:
        print(f"mthl-ds: config error: {e}", file=sys.stderr)
        return 2
    except ShardError as e:
        print(f"mthl-ds: data error: {e}", file=sys.stderr)
        return 2
    except CheckpointError as e:
        print(f"mthl-ds: checkpoint error: {e}", file=sys.stderr)
        return 2
    except ExportError as e:
        print(f"mthl-ds: model file error: {e}", file=sys.stderr)
        return 2
    except (UsageError, InputError) as e:
        print(f"mthl-ds: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""Table 3: each adaptation mode (``mthl_ds.adapt_modes``) run as one or two phases of ordinary training on a new
dataset, each phase a recipe with an ``adapt`` section (its model: ``mthl_ds.artifacts.adapted``), and the table.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

import yaml

from mthl_ds.adapt_modes import MODES, ROUTERS
from mthl_ds.artifacts.adapted import adapted_model
from mthl_ds.artifacts.export import load_export, read_metadata
from mthl_ds.config import ConfigError, load_recipe, recipe_from_dict, recipe_to_dict
from mthl_ds.models.counting import count_parameters, image_flops
from mthl_ds.models.mthl import MTHLModel


@dataclasses.dataclass
class NewDataset:
    """A dataset to adapt to: its name, shard folder (train/ and val/) and input geometry."""
    name: str
    shards: Path
    size: tuple[int, int]
    batch_size: int = 16
    head_channels: int = 0  # 0: the mmdet/mmseg head width

    def config(self, top_k: Optional[int]) -> dict:
        from mthl_ds.data.reader import ShardSet
        index = ShardSet.open(self.shards / "train").index
        return {"task": index["task"], "num_classes": index["num_classes"], "shards": str(self.shards.resolve()),
                "size": list(self.size), "batch_size": self.batch_size, "top_k": top_k, "sample_weight": 1.0,
                "head_channels": self.head_channels}


def source_size(model: Path, shards: Path) -> tuple[int, int]:
    """The input size the model was trained at for the task of ``shards`` (e.g. a detection set adapts at the
    canvas of the model's detection dataset), from the export's recipe."""
    from mthl_ds.data.reader import ShardSet
    task = ShardSet.open(Path(shards) / "train").index["task"]
    trained = read_metadata(Path(model))["built_from"]["datasets"]
    for name, d in trained.items():
        if d["task"] == task:
            return tuple(d["size"])
    raise ConfigError(f"{model} was trained on no {task} dataset ({', '.join(trained)}): give --size H W for "
                      f"{shards}")


def phase_recipe(source: Path, data: NewDataset, adapt: dict, top_k: Optional[int], train: dict,
                 usage: Optional[Path] = None, keep_datasets: bool = False) -> dict:
    meta = read_metadata(source)
    base = recipe_to_dict(recipe_from_dict(meta["built_from"], str(source)))
    section = {"source": str(source.resolve()), "keep_datasets": keep_datasets, **ROUTERS, **adapt}
    if usage is not None:
        section["usage"] = str(usage.resolve())
    return {"name": f"adapt_{data.name}", "description": f"adapt {source.name} to {data.name}",
            "model": base["model"], "datasets": {data.name: data.config(top_k)},
            "train": {**base["train"], "ep_size": 1, "ds_config": "stage0_fp32.json", "ckpt_every": 0,
                      "eval_every": 0, "keep_checkpoints": 1, "log_every": 10, **train},
            "adapt": section}


def run_phase(recipe_dict: dict, out: Path) -> tuple[dict, Path]:
    """Write the recipe, train it in this process (one rank), export the result. Returns (metrics, export)."""
    from mthl_ds.artifacts.export import export_run
    from mthl_ds.train import Trainer
    out.mkdir(parents=True, exist_ok=True)
    recipe_path = out / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe_dict, sort_keys=False))
    recipe = load_recipe(str(recipe_path))
    results = Trainer(recipe, out / "run").run()
    return results, export_run(out / "run", out / "model.safetensors")


def run_mode(model: Path, data: NewDataset, mode: str, out: Path, train: dict, stats_images: int = 256) -> dict:
    """One Table-3 row: the mode's phases, then its figures (trainable / model parameters, FLOPs, metric)."""
    from mthl_ds.analysis.stats import routing_statistics, write_statistics
    from mthl_ds.data.reader import ShardSet
    if mode not in MODES:
        raise ConfigError(f"unknown adaptation mode {mode!r}; choose from {sorted(MODES)}")
    phases, top_k = MODES[mode]
    source, usage, results = Path(model), None, None
    for i, adapt in enumerate(phases):
        last = i == len(phases) - 1
        phase_dir = out / f"phase{i + 1}"
        recipe = phase_recipe(source, data, adapt, top_k if last else None, train, usage)
        results, source = run_phase(recipe, phase_dir)
        if not last:  # the routing statistics of the router just learned, on the new dataset's train split
            learned, _ = load_export(source)
            stats = routing_statistics(learned, {data.name: ShardSet.open(data.shards / "train")},
                                       {data.name: data.size}, max_images=stats_images)
            usage = write_statistics(stats, phase_dir / "stats")[0]
    final_recipe = load_recipe(str(out / f"phase{len(phases)}" / "recipe.yaml"))
    figures = adaptation_figures(adapted_model(final_recipe), data)
    row = {"mode": mode, "dataset": data.name, **figures,
           "metric": results[data.name]["metric"], "value": results[data.name]["value"],
           "chance": results[data.name]["chance"], "phases": len(phases), "export": str(source)}
    (out / "result.json").write_text(json.dumps(row, indent=1) + "\n")
    return row


def adaptation_figures(model: MTHLModel, data: NewDataset) -> dict:
    """Table 3's columns: trainable and model parameters (backbone + the dataset's head; other heads and
    routers are gone) and backbone FLOPs per image of the dataset's size (torch's counter, 2 per MAC)."""
    flops = image_flops(model, data.name, data.size)
    return {"trainable_params": count_parameters(model, trainable_only=True),
            "model_params": count_parameters(model), "flops": flops}


# ------------------------------------------------------------------------------------------ the Table-3 report

def write_table(rows: list[dict], out: Path) -> Path:
    """Table 3 on the given rows (markdown, ratios against ``full``) and Fig. 3's trade-off plots."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    datasets = sorted({r["dataset"] for r in rows})
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    cell = {(r["mode"], r["dataset"]): r for r in rows}
    lines = ["| mode | " + " | ".join(f"{d} train. par. (M) | {d} model par. (M) | {d} GFLOPs | {d} "
                                      f"{next(r['metric'] for r in rows if r['dataset'] == d and 'metric' in r)}"
                                      for d in datasets) + " |",
             "|---|" + "---|---|---|---|" * len(datasets)]
    for mode in modes:
        parts = []
        for d in datasets:
            r = cell.get((mode, d))
            if r is None or "error" in r:
                parts.append("refused | | | " + (r["error"][:60] if r else ""))
                continue
            parts.append(f"{r['trainable_params'] / 1e6:.3f} | {r['model_params'] / 1e6:.3f} | "
                         f"{r['flops'] / 1e9:.3f} | {r['value']:.1f}")
        lines.append(f"| {mode} | " + " | ".join(parts) + " |")
    out.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(len(datasets), 3, figsize=(13, 3.6 * len(datasets)), squeeze=False)
    for di, d in enumerate(datasets):
        done = [r for r in rows if r["dataset"] == d and "error" not in r]
        for ai, (key, label) in enumerate((("trainable_params", "trainable parameters (M)"),
                                           ("model_params", "model parameters (M)"), ("flops", "GFLOPs per image"))):
            ax = axes[di][ai]
            scale = 1e9 if key == "flops" else 1e6
            for r in done:
                ax.scatter(r[key] / scale, r["value"])
                ax.annotate(r["mode"], (r[key] / scale, r["value"]), fontsize=7)
            ax.set_xlabel(label)
            ax.set_ylabel(f"{d} {done[0]['metric'] if done else ''}")
    fig.tight_layout()
    fig.savefig(out / "tradeoff.png", dpi=100)
    plt.close(fig)
    path = out / "table3.md"
    path.write_text("\n".join(lines) + "\n\n![trade-off](tradeoff.png)\n")
    (out / "table3.json").write_text(json.dumps(rows, indent=1) + "\n")
    return path

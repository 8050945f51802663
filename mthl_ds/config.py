"""Recipes: YAML files read into typed dataclasses. Unknown keys are errors; ``--set a.b=c`` overrides.

A recipe may name a ``base`` recipe; its mapping is merged over the base's, key by key.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from mthl_ds.geometry import size_problem

RECIPE_DIR = Path(__file__).parent / "recipes"
DS_CONFIG_DIR = Path(__file__).resolve().parent.parent / "ds_configs"
TASKS = ("classification", "detection", "segmentation")


class ConfigError(ValueError):
    """A recipe or override that cannot be used; the message names the key or value at fault."""


@dataclass
class AttentionMoEConfig:
    """Mod-Squad's MoE attention: in the blocks ``moe.layers`` names, the attention becomes E attention
    experts (each its own query and output projection over shared keys and values), top-K per token by the
    dataset's router. ViT backbones only (timm ``Attention``); off unless ``model.moe.attention`` is set."""
    num_experts: int = 15
    top_k: int = 6
    head_dim: int = 0  # width of one attention expert; 0: block width / top_k (FLOPs-matched, Mod-Squad A3)
    losses: dict[str, float] = field(default_factory=lambda: {"mi": 0.01})


@dataclass
class MoEConfig:
    """Which MLPs become MoE MLPs and how they route. Every value is the paper's default."""
    num_experts: int = 12
    top_k: int = 4
    # "paper": every MLP for T/S backbones, every second for B; "all"; "every_second" (AdaMV-MoE's "every two");
    # AdaMV-MoE's "early" / "middle" / "later" halves of the blocks; or block indices
    layers: Union[Literal["paper", "all", "every_second", "early", "middle", "later"], tuple[int, ...]] = "paper"
    hidden_divisor: Optional[int] = None  # expert hidden = dense hidden / this; None: / top_k (FLOPs-matched)
    capacity_factor: float = 1.0
    eval_capacity_factor: float = 1.0  # only with eval_drop_tokens
    min_capacity: int = 4
    drop_tokens: bool = True  # training: routes over capacity are dropped (DeepSpeed's capacity)
    # evaluation and prediction: False sizes capacity to the busiest expert, so no route is ever dropped and an
    # image's output does not depend on the other images of its batch, the batch size or the number of ranks
    eval_drop_tokens: bool = False
    renormalize: bool = False
    noise_std: float = 0.0
    router_hidden: int = 0
    mi_momentum: float = 0.98
    losses: dict[str, float] = field(default_factory=lambda: {"mi": 0.01})
    upcycle: Optional[Literal["copy", "split"]] = None
    # training dispatch: "capacity" pads each expert to a fixed capacity and drops what overflows (DeepSpeed's
    # layer, the paper's); "dropless" sorts the routes by expert and runs each expert on exactly its tokens
    dispatch: Literal["capacity", "dropless"] = "capacity"
    attention: Optional[AttentionMoEConfig] = None  # Mod-Squad MoE attention in the same blocks; None: off


@dataclass
class ModelConfig:
    backbone: str = "swin_tiny_patch4_window7_224"
    img_size: int = 224
    drop_path_rate: float = 0.1
    moe: Optional[MoEConfig] = field(default_factory=MoEConfig)  # None: the dense twin (MTHL.D)
    grad_checkpointing: bool = False  # recompute backbone blocks in backward (activation memory for compute)
    # a timm checkpoint of the dense backbone (e.g. ImageNet-pretrained); with MoE, moe.upcycle makes the
    # experts from its MLPs. Used when a run starts, not when a checkpoint or an export is loaded.
    init_from: Optional[str] = None


@dataclass
class DatasetConfig:
    """One training dataset: its task, data, input geometry and place in the two-step sampling."""
    task: Literal["classification", "detection", "segmentation"]
    sample_weight: float = 1.0
    batch_size: int = 2
    loss_weight: float = 1.0
    top_k: Optional[int] = None  # None: the model's moe.top_k
    num_classes: int = 1000
    shards: str = ""  # folder holding train/ and val/ shard sets; relative paths are under train.data_root
    size: tuple[int, ...] = (224, 224)  # (h, w): crop (classification, segmentation) or canvas (detection)
    eval_batch_size: int = 0  # 0: batch_size
    aux_weight: float = 0.4  # segmentation: FCN auxiliary head loss weight (0: no auxiliary head)
    crop_scale: tuple[float, ...] = (0.08, 1.0)  # classification: RandomResizedCrop area range
    head_channels: int = 0  # 0: the mmdet/mmseg width (RetinaNet FPN 256, UperNet 512); the demo uses less
    # detection: RetinaNet's parameters as mmdet lays them out; "torchvision": as this package built them before
    # (no feature norms, P6 from P5), which stored recipes without this key are read as (config.recipe_from_dict)
    head_layout: Literal["openmmlab", "torchvision"] = "openmmlab"


@dataclass
class AESConfig:
    """AdaMV-MoE's adaptive expert selection (Algorithm 1): each dataset's K starts at its top_k (1 in the
    paper), grows by one when the dataset's held-out loss has not improved for ``patience`` steps, steps back
    once when a growth did not help, then stays fixed."""
    patience: int = 2000  # Δn, in training steps
    every: int = 200  # held-out losses are measured every this many steps
    holdout: float = 0.01  # share of each dataset's training samples held out (never trained on)
    max_batches: int = 0  # held-out batches per dataset and check; 0: all of them


@dataclass
class TrainConfig:
    steps: int = 240_000
    optimizer: Literal["lamb", "adamw"] = "lamb"
    lr: float = 0.004
    weight_decay: float = 0.05
    grad_clip: float = 0.1
    warmup_steps: int = 10_000
    seed: int = 0
    ep_size: int = 1
    ds_config: str = "zero2_fp32.json"  # a file in ds_configs/ or a path; runtime values are merged in code
    data_root: str = "data_shards"
    workers: int = 2  # DataLoader workers per dataset and rank
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate at the end only
    ckpt_every: int = 1000
    keep_checkpoints: int = 2
    # a rank waiting this long on a lost or hung peer raises (engine.init_distributed)
    collective_timeout_s: float = 600.0
    nonfinite: Literal["skip", "stop"] = "skip"  # what every rank does when any rank's loss is not finite
    deterministic: bool = False  # bitwise-repeatable GPU kernels where torch has them (slower); CPU runs already are
    aes: Optional[AESConfig] = None  # adaptive K per dataset (AdaMV-MoE); None: K stays as configured
    dataset_cycle: tuple[str, ...] = ()  # these datasets in turn instead of weighted sampling (rehearsals, debugging)


@dataclass
class AdaptConfig:
    """Start from an exported model and adapt it to the recipe's datasets (``mthl_ds.adapt``). Each dataset the
    model lacks gets a new router in every MoE layer and a new head; ``model`` is taken from the export."""
    source: str = ""  # the exported model file (mthl-ds export)
    keep_datasets: bool = False  # keep the export's own routers and heads (continual learning); else drop them
    freeze_backbone: bool = True  # train only the datasets' routers and heads plus the parts below; False: all
    tune_experts: int = 0  # experts per MoE layer trained with the routers
    selection: Literal["random", "most_used", "least_used"] = "random"  # which experts tune_experts picks
    prune_fraction: float = 0.0  # remove this share of each layer's experts, least used first
    prune_threshold: float = 0.0  # remove the experts given less than this share of a layer's routes
    usage: str = ""  # routing statistics (mthl-ds stats) that pruning and most/least_used selection read
    add_experts: int = 0  # continual learning: C new experts per MoE layer, trained; old routers never select them
    adapter_reduction: int = 0  # the adapter baseline: a bottleneck adapter (width dim / this) after each MoE MLP


@dataclass
class Recipe:
    name: str
    model: ModelConfig
    datasets: dict[str, DatasetConfig]
    train: TrainConfig = field(default_factory=TrainConfig)
    adapt: Optional[AdaptConfig] = None
    description: str = ""

    def top_k_per_dataset(self) -> dict[str, int]:
        if self.model.moe is None:
            return {}
        return {n: d.top_k or self.model.moe.top_k for n, d in self.datasets.items()}


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml") if not p.stem.startswith("_"))


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_raw(name_or_path: str, seen: tuple[str, ...] = ()) -> dict:
    path = Path(name_or_path)
    if not path.suffix:
        path = RECIPE_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ConfigError(f"recipe {name_or_path!r} not found (known recipes: {', '.join(list_recipes())})")
    if str(path) in seen:
        raise ConfigError(f"recipe {path} includes itself through 'base'")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping, got {type(raw).__name__}")
    base = raw.pop("base", None)
    if base is not None:
        raw = _merge(_read_raw(base, seen + (str(path),)), raw)
    if isinstance(raw.get("datasets"), dict):  # `name: null` removes a dataset the base recipe has
        raw["datasets"] = {k: v for k, v in raw["datasets"].items() if v is not None}
    return raw


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like a.b=value")
    key, value = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(value)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and build dataclasses; raise naming ``where``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} fits none of the allowed types ({'; '.join(errors)})")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected null, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{where}: {value!r} is not one of {list(typing.get_args(tp))}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        hints = typing.get_type_hints(tp)
        names = {f.name for f in dataclasses.fields(tp)}
        unknown = set(value) - names
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(names)}")
        kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in value.items()}
        try:
            return tp(**kwargs)
        except TypeError as e:
            raise ConfigError(f"{where or 'recipe'}: {e}") from None
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {_coerce(k, key_tp, where): _coerce(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp, _) = typing.get_args(tp)
        return tuple(_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def validate(recipe: Recipe) -> None:
    """Checks that span several keys. Runs before any process group or model is created."""
    moe = recipe.model.moe
    if not recipe.datasets:
        raise ConfigError("datasets: a recipe needs at least one dataset")
    if moe is not None:
        if not 1 <= moe.top_k <= moe.num_experts:
            raise ConfigError(f"model.moe.top_k={moe.top_k} must be between 1 and num_experts={moe.num_experts}")
        for name, k in recipe.top_k_per_dataset().items():
            if not 1 <= k <= moe.num_experts:
                raise ConfigError(f"datasets.{name}.top_k={k} must be between 1 and num_experts={moe.num_experts}")
        if moe.num_experts % recipe.train.ep_size:
            raise ConfigError(f"model.moe.num_experts={moe.num_experts} is not divisible by "
                              f"train.ep_size={recipe.train.ep_size}")
        att = moe.attention
        if att is not None:
            if not recipe.model.backbone.startswith("vit"):
                raise ConfigError(f"model.moe.attention: MoE attention needs a ViT backbone (timm Attention blocks); "
                                  f"{recipe.model.backbone!r} has none")
            if not 1 <= att.top_k <= att.num_experts:
                raise ConfigError(f"model.moe.attention.top_k={att.top_k} must be between 1 and "
                                  f"num_experts={att.num_experts}")
    init_from = recipe.model.init_from
    if init_from is not None:
        if not Path(init_from).is_file():
            raise ConfigError(f"model.init_from: {init_from} is not a file")
        if moe is not None and moe.upcycle is None:
            raise ConfigError("model.init_from: set model.moe.upcycle (copy or split), or the loaded MLPs are "
                              "replaced by randomly initialised experts")
    unknown = [n for n in recipe.train.dataset_cycle if n not in recipe.datasets]
    if unknown:
        raise ConfigError(f"train.dataset_cycle names {unknown}, not datasets of the recipe {list(recipe.datasets)}")
    aes = recipe.train.aes
    if aes is not None:
        if moe is None:
            raise ConfigError("train.aes: adaptive expert selection needs MoE layers (model.moe is null)")
        if not 0 < aes.holdout < 1:
            raise ConfigError(f"train.aes.holdout={aes.holdout} must be in (0, 1)")
        for key in ("patience", "every"):
            if getattr(aes, key) < 1:
                raise ConfigError(f"train.aes.{key}={getattr(aes, key)} must be >= 1")
    if recipe.adapt is not None:
        validate_adapt(recipe.adapt)
    stage = zero_stage(recipe)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{recipe.train.ds_config}: zero_optimization.stage={stage} must be 0, 1, 2 or 3")
    if moe is not None and stage == 3:
        raise ConfigError(f"{recipe.train.ds_config}: ZeRO stage 3 cannot be used with MoE layers (DeepSpeed "
                          "refuses native MoE under ZeRO 3); use a stage 1 or 2 config, or set model.moe=null")
    for name, d in recipe.datasets.items():
        if d.batch_size < 1:
            raise ConfigError(f"datasets.{name}.batch_size={d.batch_size} must be >= 1")
        if len(d.size) != 2 or min(d.size) < 1:
            raise ConfigError(f"datasets.{name}.size={list(d.size)} must be [height, width]")
        if d.sample_weight < 0:
            raise ConfigError(f"datasets.{name}.sample_weight={d.sample_weight} must be >= 0")
        problem = size_problem(recipe.model.backbone, recipe.model.img_size, d.task, d.size)
        if problem:
            raise ConfigError(f"datasets.{name}.size={list(d.size)}: {problem}")


def validate_adapt(a: AdaptConfig) -> None:
    if not a.source:
        raise ConfigError("adapt.source: name the exported model file to start from")
    if not 0 <= a.prune_fraction < 1:
        raise ConfigError(f"adapt.prune_fraction={a.prune_fraction} must be in [0, 1)")
    if not 0 <= a.prune_threshold < 1:
        raise ConfigError(f"adapt.prune_threshold={a.prune_threshold} must be in [0, 1)")
    if a.prune_fraction and a.prune_threshold:
        raise ConfigError("adapt: set prune_fraction or prune_threshold, not both")
    needs_usage = a.prune_fraction or a.prune_threshold or (a.tune_experts and a.selection != "random")
    if needs_usage and not a.usage:
        raise ConfigError("adapt.usage: pruning and most/least_used selection need routing statistics "
                          "(mthl-ds stats MODEL --data SHARDS --out FILE)")
    for key in ("tune_experts", "add_experts", "adapter_reduction"):
        if getattr(a, key) < 0:
            raise ConfigError(f"adapt.{key}={getattr(a, key)} must be >= 0")


def ds_config_path(name: str) -> Path:
    path = Path(name)
    if not path.is_file():
        path = DS_CONFIG_DIR / name
    if not path.is_file():
        raise ConfigError(f"train.ds_config: {name!r} is neither a file nor one of "
                          f"{sorted(p.name for p in DS_CONFIG_DIR.glob('*.json'))}")
    return path


def read_ds_config(name: str) -> dict:
    path = ds_config_path(name)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None


def zero_stage(recipe: Recipe) -> int:
    return int(read_ds_config(recipe.train.ds_config).get("zero_optimization", {}).get("stage", 0))


def load_recipe(name_or_path: str, overrides: typing.Sequence[str] = ()) -> Recipe:
    """Read a recipe by name (``mthl_ds/recipes/NAME.yaml``) or path, apply ``a.b=c`` overrides, validate."""
    raw = _read_raw(name_or_path)
    raw.setdefault("name", Path(name_or_path).stem)
    for text in overrides:
        keys, value = _parse_override(text)
        node = raw
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                node[k] = {} if node.get(k) is None else node[k]
                if not isinstance(node[k], dict):
                    raise ConfigError(f"override {text!r}: {k!r} is not a mapping")
            node = node[k]
        node[keys[-1]] = value
    recipe = _coerce(raw, Recipe, "")
    validate(recipe)
    return recipe


def recipe_from_dict(raw: dict, where: str) -> Recipe:
    """A recipe stored as a dict (a checkpoint's or an export's), checked as a recipe file is. Its
    ``model.init_from`` is cleared: the weights are where the recipe is stored, the file may be long gone. A
    dataset without ``head_layout`` was stored before the key existed: its heads are ``"torchvision"``'s."""
    raw = dict(raw)
    if isinstance(raw.get("model"), dict):
        raw["model"] = {**raw["model"], "init_from": None}
    if isinstance(raw.get("datasets"), dict):  # a stored recipe has every key: one without it predates it
        raw["datasets"] = {name: {"head_layout": "torchvision", **d} if isinstance(d, dict) else d
                           for name, d in raw["datasets"].items()}
    try:
        recipe = _coerce(raw, Recipe, "")
        validate(recipe)
    except ConfigError as e:
        raise ConfigError(f"{where}: the recipe stored there is not usable: {e}") from None
    return recipe


def recipe_to_dict(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe)

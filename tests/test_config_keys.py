"""Every recipe key and every `mthl-ds` flag is named by a test (or, for a key, set by a shipped recipe): a static
check over the test sources, so an option added without a test fails here, with the missing ones named.

Naming is a necessary condition, not proof: that each option is exercised by a test that would fail if it were
ignored is what the tests themselves (tests/test_options.py, tests/test_cli_options.py and the rest) assert."""
import argparse
import ast
import dataclasses
import re
import types
import typing
from pathlib import Path

import pytest
import yaml

from mthl_ds import config

TESTS = Path(__file__).resolve().parent
SOURCES = [p for p in sorted(TESTS.glob("*.py")) + sorted((TESTS / "workers").glob("*.py"))
           if p.name != Path(__file__).name]  # this file names keys and flags in its examples and tables
RECIPES = sorted(config.RECIPE_DIR.glob("*.yaml"))
SECTIONS = ("model", "datasets", "train", "adapt")
RECIPE_LOADERS = {"load_recipe", "recipe_from_dict"}


# ------------------------------------------------------------------------------------------ the recipe's keys

def recipe_keys(tp=config.Recipe, prefix=""):
    """``{dotted key: default}`` for every field of the recipe's dataclasses: leaves, and the optional sections
    (``model.moe``, ``model.moe.attention``, ``train.aes``, ``adapt``: null is a setting). A dataset's keys are
    ``datasets.*.KEY``; a field without a default (``datasets.*.task``) has ``dataclasses.MISSING``."""
    keys = {}
    hints = typing.get_type_hints(tp)
    for f in dataclasses.fields(tp):
        t, path = hints[f.name], prefix + f.name
        options = typing.get_args(t) if typing.get_origin(t) in (typing.Union, types.UnionType) else (t,)
        nested = [o for o in options if dataclasses.is_dataclass(o)]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if typing.get_origin(t) is dict and dataclasses.is_dataclass(typing.get_args(t)[1]):
            keys.update(recipe_keys(typing.get_args(t)[1], path + ".*."))
        elif nested:
            if type(None) in options:
                keys[path] = default
            keys.update(recipe_keys(nested[0], path + "."))
        else:
            keys[path] = default
    return keys


KEYS = recipe_keys()


def is_section(key):
    return any(k.startswith(key + ".") for k in KEYS)


# ------------------------------------------------------------------------------------------ named by a test

def key_pattern(key):
    """An override string's key: ``train.aes.max_batches``, ``datasets.<any name>.aux_weight``."""
    return "".join(r"[A-Za-z_]\w*" if s == "*" else re.escape(s) for s in re.split(r"(\*)", key))


def chain(node):
    """``recipe.datasets["coco"].aux_weight`` -> ["recipe", "datasets", "*", "aux_weight"]; a call at the root
    is "()" followed by the callee's name (``load_recipe("demo").name`` -> ["()load_recipe", "name"])."""
    parts = []
    while True:
        if isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        elif isinstance(node, ast.Subscript):
            parts.append("*")
            node = node.value
        else:
            break
    if isinstance(node, ast.Name):
        parts.append(node.id)
    elif isinstance(node, ast.Call):
        func = node.func
        parts.append("()" + (func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")))
    else:
        parts.append("?")
    return parts[::-1]


def dict_keys(node, dicts):
    """The string keys of a dict display or ``dict(...)`` call, following ``**name`` to a dict bound in the module."""
    if isinstance(node, ast.Name):
        return [k for bound in dicts.get(node.id, []) for k in dict_keys(bound, dicts)]
    if isinstance(node, ast.Dict):
        return [k for key, value in zip(node.keys, node.values)
                for k in ([key.value] if isinstance(key, ast.Constant) else dict_keys(value, dicts) if key is None
                          else [])]
    if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "dict":
        return [k for kw in node.keywords for k in ([kw.arg] if kw.arg else dict_keys(kw.value, dicts))]
    return []


def named_in(sources):
    """What the test sources name, as (override strings, attribute chains, names bound to loaded recipes)."""
    strings, chains, recipe_names = [], [], set()
    for text in sources:
        tree = ast.parse(text)
        dicts = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and isinstance(node.value, (ast.Dict, ast.Call)):
                for target in node.targets:
                    if isinstance(target, ast.Name):
                        dicts.setdefault(target.id, []).append(node.value)
        inner = set()
        for node in ast.walk(tree):
            links = (ast.Attribute, ast.Subscript)
            if isinstance(node, links) and isinstance(node.value, links):
                inner.add(id(node.value))
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                strings.append(node.value)
            elif isinstance(node, ast.JoinedStr):  # f"datasets.{name}.aux_weight={w}" -> "datasets.X.aux_weight=X"
                strings.append("".join(str(v.value) if isinstance(v, ast.Constant) else "X" for v in node.values))
            elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and \
                    getattr(node.value.func, "id", None) in RECIPE_LOADERS:
                recipe_names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "demo_overrides":
                # conftest.demo_overrides(shards, key=value, **{"a.b": value}) sets train.key, train.a.b
                for kw in node.keywords:
                    strings += [f"train.{k}=" for k in ([kw.arg] if kw.arg else dict_keys(kw.value, dicts))]
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and id(node) not in inner:
                chains.append(chain(node))
    return strings, chains, recipe_names


def named_by(key, strings, chains, recipe_names):
    """Whether ``key`` is named: an override ``KEY=...`` at the start of a string or after a space (a list of
    settings, as slurm/train.sbatch's ``MTHL_SET``; a section also by one of its keys, ``KEY.x=``), or
    an attribute chain that ends with the key's path (``recipe.train.aes.max_batches``,
    ``r.datasets["coco"].aux_weight``; a section anywhere in the chain, ``recipe.train.aes.every``), a top-level key
    only on a loaded recipe (``load_recipe("demo").description``)."""
    section = is_section(key)
    start = "^" if "." not in key else r"(?:^|\s)"  # ``name=x`` only as a whole override, not inside a sentence
    override = re.compile(start + key_pattern(key) + (r"[=.]" if section else "="))
    if any(override.search(s) for s in strings):
        return True
    path = key.split(".")
    for parts in chains:
        if len(path) == 1:
            if parts[-1] == key and len(parts) == 2 and (parts[0] in recipe_names or
                                                         parts[0][2:] in RECIPE_LOADERS):
                return True
            continue
        if path[0] not in SECTIONS:
            continue
        spots = [i for i in range(len(parts) - len(path) + 1) if parts[i:i + len(path)] == path]
        if any(section or i + len(path) == len(parts) for i in spots):
            return True
    return False


def source_texts():
    texts = [p.read_text() for p in SOURCES]
    from conftest import demo_overrides  # the helper's own settings
    texts.append("\n".join(repr(o) for o in demo_overrides(Path("SHARDS"))))
    return texts


def recipe_values(key):
    """Every value a shipped recipe file gives ``key`` in its own mapping (base recipes not merged in)."""
    values = []
    for path in RECIPES:
        nodes = [yaml.safe_load(path.read_text()) or {}]
        for part in key.split("."):
            nodes = [v for n in nodes if isinstance(n, dict) for k, v in n.items() if part in ("*", k)]
        values += nodes
    return values


def plain(value):
    return tuple(value) if isinstance(value, (list, tuple)) else value


def set_by_recipe(key):
    """Whether a shipped recipe sets ``key`` to a value other than its default (restating a default sets nothing; an
    optional section counts when a recipe turns it on or off, its keys one by one)."""
    default = KEYS[key]
    for value in recipe_values(key):
        if is_section(key):
            if (value is None) != (default is None):
                return True
        elif default is dataclasses.MISSING or plain(value) != plain(default):
            return True
    return False


def test_the_scan_reads_what_it_claims():
    """The rule on small sources: override strings, ``demo_overrides`` keywords and attribute chains name keys; a
    variable that happens to be called ``model`` (``model.backbone.moe_layers``) does not name ``model.backbone``."""
    strings, chains, names = named_in([
        'load_recipe("demo", ["model.moe.eval_capacity_factor=0.5", f"datasets.{n}.aux_weight={w}"])',
        'train = dict(deterministic=True)\ndemo_overrides(shards, eval_every=2, **{"aes.max_batches": 1, **train})',
        '"train.steps=4 train.collective_timeout_s=30"',
        '"see ``train.seed=3``"',  # not an override: inside a word
        'r = load_recipe("demo")\nr.train.aes.holdout\nr.datasets["coco"].crop_scale\nr.description',
        'model.backbone.moe_layers[0].gate\nload_recipe("demo").name',
    ])
    named = {k for k in KEYS if named_by(k, strings, chains, names)}
    assert named == {"model.moe", "model.moe.eval_capacity_factor", "datasets.*.aux_weight", "train.eval_every",
                     "train.aes", "train.aes.max_batches", "train.aes.holdout", "datasets.*.crop_scale",
                     "description", "name", "train.deterministic", "train.steps", "train.collective_timeout_s"}, named
    assert set_by_recipe("model.moe.attention") and set_by_recipe("datasets.*.crop_scale")  # demo_modsquad, demo
    assert not set_by_recipe("model.moe.mi_momentum")  # _paper.yaml restates the default 0.98
    assert not set_by_recipe("train.aes.max_batches")


def test_every_recipe_key_is_named_by_a_test_or_set_by_a_recipe():
    """Rule: each key of ``mthl_ds/config.py`` (every field of every recipe dataclass as a dotted path,
    ``datasets.*.KEY`` for a dataset's, the optional sections ``model.moe``, ``model.moe.attention``, ``train.aes``
    and ``adapt`` included) must be

    * named by a test (tests/*.py, tests/workers/*.py): as an override string ``KEY=VALUE`` (``--set``,
      ``load_recipe`` overrides; any dataset name for ``*``), as a keyword of ``conftest.demo_overrides`` (which
      writes ``train.KEY=VALUE``, its own defaults included), or as an attribute chain ending with the key's path
      on a recipe object (``recipe.train.aes.max_batches``, ``r.datasets["coco"].aux_weight``, a top-level key such
      as ``description`` only on a loaded recipe); or
    * set by a shipped recipe (mthl_ds/recipes/*.yaml) to a value other than its default: the test suite loads every
      recipe and trains or rehearses the demo family and ``mthl_swin_t``, ``modsquad_vit_s``.

    A key only ever at its default (in config.py, or restated in a recipe) fails. Keys a test sets through a helper
    that takes a whole section as a dict (``adapt.phase_recipe``'s ``adapt`` and ``train`` dicts) are not seen:
    such a test names the key as an override or an attribute as well."""
    assert {"train.aes.max_batches", "datasets.*.aux_weight", "model.moe.eval_capacity_factor",
            "adapt.adapter_reduction", "adapt.prune_threshold", "train.eval_every"} <= set(KEYS)
    assert len(KEYS) > 70 and "model" not in KEYS and "train" not in KEYS and "model.moe" in KEYS
    strings, chains, names = named_in(source_texts())
    missing = [k for k in KEYS if not named_by(k, strings, chains, names) and not set_by_recipe(k)]
    assert not missing, (f"recipe keys no test names and no recipe sets (the defaults only): {missing}; add a test "
                         "that sets each and asserts what it changes")


# ------------------------------------------------------------------------------------------ the command line

class Captured(Exception):
    def __init__(self, parser):
        self.parser = parser


def parser_of(main, argv, monkeypatch):
    """The argparse parser ``main(argv)`` builds, caught at its first parse (nothing runs)."""
    def capture(self, args=None, namespace=None):
        raise Captured(self)
    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_known_args", capture)
        with pytest.raises(Captured) as caught:
            main(argv)
    return caught.value.parser


def command_flags(monkeypatch):
    """``{verb: [its --flags]}`` of ``mthl-ds`` (``train``: those of ``mthl_ds.train``, which parses them)."""
    from mthl_ds import cli, train
    parser = parser_of(cli.main, ["recipes"], monkeypatch)
    verbs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    flags = {verb: [s for a in p._actions for s in a.option_strings if s.startswith("--") and s != "--help"
                    and a.help != argparse.SUPPRESS] for verb, p in verbs.items()}
    flags["train"] = [s for a in parser_of(train.main, [], monkeypatch)._actions for s in a.option_strings
                      if s.startswith("--") and s != "--help" and a.help != argparse.SUPPRESS]
    return flags


def invoked(units, verbs):
    """``{verb: set of --flags}`` named in the test units (functions with the module-level constants they use, and
    each module's top level) that run it: a list whose first string is the verb (``main(["stats", ...])``), or
    whose string after ``mthl_ds.cli`` / ``mthl_ds`` is (``[python, "-m", "mthl_ds.cli", "stats", ...]``);
    ``mthl_ds.train`` runs ``train``."""
    used = {v: set() for v in verbs}
    for unit, constants in units:
        used_names = {n.id for n in ast.walk(unit) if isinstance(n, ast.Name)}
        nodes = [unit] + [value for name, value in constants.items() if name in used_names]
        strings = [n.value for node in nodes for n in ast.walk(node) if isinstance(n, ast.Constant)
                   and isinstance(n.value, str)]
        runs = set()
        for node in ast.walk(unit):
            if not isinstance(node, (ast.List, ast.Tuple)):
                continue
            items = [e.value if isinstance(e, ast.Constant) and isinstance(e.value, str) else None for e in node.elts]
            if items and items[0] in verbs:
                runs.add(items[0])
            for i, item in enumerate(items):
                if item in ("mthl_ds.cli", "mthl_ds") and i + 1 < len(items) and items[i + 1] in verbs:
                    runs.add(items[i + 1])
                if item == "mthl_ds.train":
                    runs.add("train")
        for verb in runs:
            used[verb] |= {s for s in strings if s.startswith("--")}
    return used


def code_units():
    """(unit, the module's top-level constants) for each test function and each module's top level."""
    units = []
    for path in SOURCES:
        tree = ast.parse(path.read_text())
        functions = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        constants = {t.id: n.value for n in tree.body if isinstance(n, ast.Assign) for t in n.targets
                     if isinstance(t, ast.Name)}
        top = ast.Module(body=[n for n in tree.body if n not in functions], type_ignores=[])
        units += [(f, constants) for f in functions] + [(top, {})]
    return units


# flags no test runs, each with why (the price of a test that would fail if the flag were ignored)
UNTESTED_FLAGS = {
    ("rehearse", "--steps"): "a rehearsal launches 2 ranks twice at the paper's data sizes: about 65 s even for the "
                             "demo model; test_rehearse's two real-size rehearsals could pass it at no extra cost",
    ("rehearse", "--batch-size"): "as --steps",
    ("train", "--cpu-fp16"): "run by test_rehearse's fp16 rehearsal (mthl_ds.studies.rehearse launches the ranks "
                             "with it; without it DeepSpeed refuses fp16 on the CPU), not named in a test",
}


def test_every_command_line_flag_is_used_by_a_test_of_its_verb(monkeypatch):
    """Rule: each ``--flag`` of each ``mthl-ds`` verb (and of ``mthl_ds.train``) appears in a test unit (a test
    function, fixture or helper, or a module's top level) that runs that verb, unless listed in
    ``UNTESTED_FLAGS`` with the reason; a listed flag that a test does use must leave the list."""
    flags = command_flags(monkeypatch)
    assert {"stability", "adapt-report", "stats", "train"} <= set(flags) and "--force" in flags["adapt-report"]
    used = invoked(code_units(), set(flags))
    missing = sorted((verb, f) for verb, fs in flags.items() for f in fs
                     if f not in used[verb] and (verb, f) not in UNTESTED_FLAGS)
    assert not missing, f"flags no test of their verb uses: {missing}"
    stale = sorted(k for k in UNTESTED_FLAGS if k[1] in used[k[0]] or k[1] not in flags.get(k[0], []))
    assert not stale, f"UNTESTED_FLAGS lists flags a test now uses, or that no longer exist: {stale}"

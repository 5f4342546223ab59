"""The study's typed config (grid YAML + dotted overrides) and its expansion into grid points."""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import yaml

from pipelines import models
from pipelines.config import ConfigError, apply_overrides, from_dict, load_yaml
from pipelines.data import SourceConfig, default_cache_dir
from pipelines.data.preflight import Findings, inspect
from pipelines.data.sources import expand_urls, is_local
from pipelines.data.stream import LoaderConfig
from pipelines.downstream import EvaluateConfig
from pipelines.pretrain import PretrainConfig
from study.identity import point_id
from study.recipes import Recipes


@dataclass(frozen=True)
class DataConfig:
    pretrain: SourceConfig
    subsets: tuple[int, ...]  # numbers of examples; each subset contains the smaller ones
    cache_dir: str = ""  # where generated shards live; default $VITSCALE_CACHE or ~/.cache/vit-scaling
    # streaming training data from shards; workers left out: resources.cpus_per_worker - 1 (at least 1) per rank
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    # Nested subsets of samples (a seeded permutation of every key), or of whole shards (a subset of a remote
    # source then reads only its own shards).
    subset_mode: Literal["samples", "shards"] = "samples"
    # Rows carved from a pretraining source without a test split, for upstream validation (`pipelines.data.held_out`;
    # no subset ever holds one); left out: `StudyConfig.holdout` decides.
    holdout: int | None = None


@dataclass(frozen=True)
class Resources:
    """What one grid point reserves: `workers_per_trial` workers of `cpus_per_worker` CPUs and `gpus_per_worker`
    GPUs each (one worker: the trial trains in its own process)."""

    workers_per_trial: int = 1
    cpus_per_worker: float = 1
    gpus_per_worker: float = 0
    max_concurrent_trials: int = 0  # 0: as many as the resources allow
    max_failures: int = 2  # Tune restarts a crashed trial this often, from its newest checkpoint

    @property
    def gpus_per_trial(self) -> float:
        return self.workers_per_trial * self.gpus_per_worker


# The held-out slice's size where `data.holdout` is left out: big_vision's ImageNet-21k validation slice (configs/
# vit_i21k.py, 'full[25_600:51_200]'; top-1's standard error under 0.32 points), at most 1% of the source, its
# ImageNet-1k minival ('train[99%:]'), so a small source keeps 99% for training.
HELD_OUT_ROWS, HELD_OUT_FRACTION = 25_600, 0.01


def held_out_rows(size: int) -> int:
    """The default held-out slice of a source of `size` training examples (at least one row)."""
    return max(1, min(HELD_OUT_ROWS, int(size * HELD_OUT_FRACTION)))


RENAMED = {"resources.cpus_per_trial": "resources.cpus_per_worker (with resources.workers_per_trial)",
           "resources.gpus_per_trial": "resources.gpus_per_worker (with resources.workers_per_trial)"}


@dataclass(frozen=True)
class StudyConfig:
    study: str  # MLflow experiment name
    data: DataConfig
    downstream: tuple[SourceConfig, ...]
    models: tuple[str, ...]
    pretrain: PretrainConfig
    seeds: tuple[int, ...] = (0,)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    resources: Resources = field(default_factory=Resources)
    recipes: Recipes = field(default_factory=Recipes)  # per model or family, merged over `pretrain` (study.recipes)

    def __post_init__(self):  # loader workers left out: from the CPUs each rank holds (saved resolved)
        loader = self.data.loader.for_cpus(self.resources.cpus_per_worker)
        object.__setattr__(self, "data", replace(self.data, loader=loader))  # frozen: set once, here

    @property
    def cache_dir(self) -> Path:
        return Path(self.data.cache_dir).expanduser() if self.data.cache_dir else default_cache_dir()

    @property
    def holdout(self) -> int:
        """Rows carved from the pretraining source for upstream validation: `data.holdout` where given; left out, a
        source without a test split carves `held_out_rows(size)` when the study evaluates during training
        (`pretrain.eval_every`, or any recipe's) and nothing otherwise, so a grid without it keeps its subsets (and
        ids). Whether it does is read from `pretrain` and every recipe, not from the models in the grid: adding or
        removing a model leaves the other points' subsets, and ids, alone."""
        if self.data.holdout is not None:
            return self.data.holdout
        during = ("eval_every", "eval_every_examples")
        evaluates = bool(self.pretrain.eval_steps) or any(
            recipe.get(key) for recipe in self.recipes.by_name.values() for key in during)
        return held_out_rows(self.data.pretrain.size) if evaluates and not has_test_split(self.data.pretrain) else 0

    def pretrain_for(self, model: str) -> PretrainConfig:
        """How `model` pretrains: `pretrain` with its family's recipe, then its own, merged over it."""
        return self.recipes.merged(self.pretrain, model)


@dataclass(frozen=True)
class GridPoint:
    id: str  # content hash of what determines its pretrained weights (study.identity)
    model: str
    family: str
    subset_size: int
    seed: int
    steps: int
    examples_seen: int
    forward_flops: int  # one image, at the pretraining resolution

    @property
    def pretrain_flops(self) -> float:
        """3 x forward FLOPs x examples seen (backward ~ 2 x forward), as in the paper's compute axis."""
        return 3.0 * self.forward_flops * self.examples_seen

    @property
    def name(self) -> str:
        return f"{self.model.replace('/', '-')}_n{self.subset_size}_s{self.seed}"

    @property
    def table_fields(self) -> dict:
        """The columns the results table carries for every row of this point."""
        return {"model": self.model, "family": self.family, "subset_size": self.subset_size,
                "examples_seen": self.examples_seen, "pretrain_flops": self.pretrain_flops, "seed": self.seed}


def load_study(path: str | Path, overrides: list[str] | None = None) -> StudyConfig:
    """Read a grid YAML, apply `key.path=value` overrides, type-check and validate it."""
    path = Path(path)
    if path.is_dir():
        grids = sorted(p.name for p in path.glob("*.yaml"))
        held = f" (it holds {', '.join(grids[:6])}{', ...' if len(grids) > 6 else ''})" if grids else ""
        raise ConfigError(f"--grid {path} is a folder{held}; give a YAML grid file, e.g. configs/scaling.yaml")
    if not path.is_file():
        raise ConfigError(f"grid file not found: {path}")
    try:
        data = load_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is not a text file (byte {err.start} is not UTF-8): give a YAML grid such as "
                          f"configs/scaling.yaml") from None
    except OSError as err:
        raise ConfigError(f"grid file {path} cannot be read: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        mark, problem = getattr(err, "problem_mark", None), getattr(err, "problem", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise ConfigError(f"{path} is not valid YAML: {where}{problem or str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of study keys at the top level")
    try:  # every error names the file, then the key path
        data = apply_overrides(data, overrides or [])
        for old, new in RENAMED.items():
            section, key = old.split(".")
            if isinstance(data.get(section), dict) and key in data[section]:
                raise ConfigError(f"{old} is now {new}")
        cfg = from_dict(StudyConfig, data)
        validate(cfg)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    return cfg


def check_data(cfg: StudyConfig) -> Findings:
    """What can be checked of every data source without a GPU or reading an image (`preflight.inspect`): the dry run
    prints it, a real run stops on its problems before Ray starts."""
    found = inspect(cfg.data.pretrain, "data.pretrain", [("data.subsets", n) for n in cfg.data.subsets])
    for i, task in enumerate(cfg.downstream):
        found += inspect(task, f"downstream[{i}]")
    return found


def validate(cfg: StudyConfig) -> None:
    """Checks that need more than one key, or more than a type; all before any work starts."""
    _check_name(cfg.study)
    if not cfg.models or not cfg.seeds or not cfg.data.subsets or not cfg.downstream:
        raise ConfigError("models, seeds, data.subsets and downstream must each list at least one entry")
    _check_distinct(cfg)
    _check_recipes(cfg)
    _check_ranges(cfg)
    specs = [models.get_spec(name) for name in cfg.models]
    subsets = cfg.data.subsets
    if min(subsets) <= 0 or list(subsets) != sorted(set(subsets)):
        raise ConfigError(f"data.subsets must be increasing positive sizes, got {list(subsets)}")
    _check_pool(cfg)
    names = [task.label for task in cfg.downstream]
    if len(set(names)) != len(names) or any("/" in n for n in names):
        raise ConfigError(f"downstream task names must be unique and contain no '/', got {names}")
    for i, task in enumerate(cfg.downstream):
        _check_test_split(task, f"downstream[{i}]")
        per_class = task.size // task.num_classes
        if cfg.evaluate.fewshot and per_class < max(cfg.evaluate.fewshot.shots):
            raise ConfigError(f"downstream[{i}].size: {max(cfg.evaluate.fewshot.shots)}-shot needs that many "
                              f"examples per class, size {task.size} gives {per_class} ('{task.label}')")
    for spec in specs:
        patch = spec.patch
        sizes = [("data.pretrain.image_size", cfg.data.pretrain.image_size)]
        if cfg.evaluate.finetune:
            sizes.append(("evaluate.finetune.image_size", cfg.evaluate.finetune.image_size))
        for key, size in sizes:
            if patch and size % patch:
                raise ConfigError(f"{key}={size} is not a multiple of {spec.name}'s patch size {patch}")


# The key that gives a downstream task its evaluation split, per source: `shapes` generates `test_size` examples;
# the others read theirs (a declared `test_size` is then checked against them, as `size` is).
_TEST_SPLIT = {"shapes": ("test_size", "a number of examples > 0"), "webdataset": ("test_urls", "shards"),
               "folder": ("test_root", "a folder of class folders")}


def has_test_split(src: SourceConfig) -> bool:
    return bool(getattr(src, _TEST_SPLIT[src.source][0]))


def _check_test_split(task: SourceConfig, key: str) -> None:
    name, what = _TEST_SPLIT[task.source]
    if not has_test_split(task):
        raise ConfigError(f"{key}.{name}: a downstream task needs a test split; give {name} ({what}) for source "
                          f"'{task.source}'")


# ASCII letters, digits, '-', '_', '.': the name becomes an MLflow experiment and a folder (runs/<study>/), so a
# '/' or a leading '.' would put the study's files somewhere else.
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


def _check_name(study: str) -> None:
    if not _NAME.fullmatch(study):
        raise ConfigError(f"study: {study!r} is not a name; use letters, digits, '-', '_' and '.', "
                          "not starting with '.'")


def _check_distinct(cfg: StudyConfig) -> None:
    """A model or seed listed twice would train and log the same grid points twice."""
    for key, values in (("models", cfg.models), ("seeds", cfg.seeds)):
        twice = [v for i, v in enumerate(values) if v in values[:i]]
        if twice:
            raise ConfigError(f"{key}: {twice[0]!r} is listed twice; its grid points would run twice")
    if min(cfg.seeds) < 0:
        raise ConfigError(f"seeds: {min(cfg.seeds)} is negative; numpy takes only non-negative seeds")
    if max(cfg.seeds) >= 2**64:
        raise ConfigError(f"seeds: {max(cfg.seeds)} is too large; torch takes seeds below 2^64 "
                          f"({2**64 - 1} at most)")


# What each rule in _check_ranges accepts; the rule's text is also the error message.
_RULES = {">= 0": lambda v: v >= 0, "> 0": lambda v: v > 0, ">= 1": lambda v: v >= 1, ">= 8": lambda v: v >= 8,
          "in [0, 1)": lambda v: 0 <= v < 1}


def _check_recipes(cfg: StudyConfig) -> None:
    """Each model's merged recipe goes together and uses only knobs its family takes."""
    for model in cfg.models:
        try:
            models.check_options(model, models.ModelOptions.of(cfg.pretrain_for(model)))
        except ConfigError as err:
            raise ConfigError(f"pretrain{cfg.recipes.where(model)}: {err}") from None
        if cfg.pretrain_for(model).eval_steps:
            _check_during_training(cfg, f"pretrain.eval_every{cfg.recipes.where(model)}")


def _check_during_training(cfg: StudyConfig, key: str) -> None:
    """Evaluation during training (`pipelines.selection`) measures upstream top-1 on the pretraining source's test
    split or, without one, on the slice carved from it (`data.holdout`), and selects on few-shot."""
    name, what = _TEST_SPLIT[cfg.data.pretrain.source]
    if not has_test_split(cfg.data.pretrain) and not cfg.holdout:
        raise ConfigError(f"{key}: evaluation during training measures upstream top-1 on the pretraining source's "
                          f"test split, which it lacks: give data.pretrain.{name} ({what}), or data.holdout > 0 rows "
                          f"carved from it")
    if cfg.evaluate.fewshot is None:
        raise ConfigError(f"{key}: evaluation during training selects on few-shot, which evaluate.fewshot=null "
                          "switches off")


def _check_pool(cfg: StudyConfig) -> None:
    """The largest subset fits in the source less its held-out slice; a slice is carved only without a test split."""
    src, held, largest = cfg.data.pretrain, cfg.holdout, max(cfg.data.subsets)
    if held < 0:
        raise ConfigError(f"data.holdout must be >= 0, got {held}")
    if held and has_test_split(src):
        raise ConfigError(f"data.holdout: {held} rows asked, but data.pretrain has a test split, which upstream "
                          f"validation uses: leave data.holdout out (or 0)")
    if largest > src.size - held:
        less = f" less the {held} held out for validation (data.holdout)" if held else ""
        raise ConfigError(f"data.subsets: {largest} examples asked, but data.pretrain holds only {src.size}{less}: "
                          f"use at most {src.size - held}" + (", or a smaller data.holdout" if held else ""))


def _pretrain_rules(cfg: StudyConfig) -> list[tuple[str, float, str]]:
    """The range rules of every model's pretraining settings, each named by where its value comes from."""
    rules = []
    for model in cfg.models:
        p, key = cfg.pretrain_for(model), cfg.recipes.where(model)
        rules += [(f"pretrain.{name}{key}", getattr(p, name), rule) for name, rule in (
            ("warmup_steps", ">= 0"), ("weight_decay", ">= 0"), ("beta1", "in [0, 1)"), ("beta2", "in [0, 1)"),
            ("grad_clip", ">= 0"),  # 0: no clipping
            ("checkpoint_every", ">= 0"),  # 0: a checkpoint at the end only
            ("keep_checkpoints", ">= 1"))]
    return list(dict.fromkeys(rules))


def _check_ranges(cfg: StudyConfig) -> None:
    """Numbers whose type allows values that make no sense: a negative count, a zero size or rate."""
    r, e = cfg.resources, cfg.evaluate
    rules = [
        *_pretrain_rules(cfg),
        ("resources.workers_per_trial", r.workers_per_trial, ">= 1"),
        ("resources.cpus_per_worker", r.cpus_per_worker, "> 0"),
        ("resources.gpus_per_worker", r.gpus_per_worker, ">= 0"),
        ("resources.max_concurrent_trials", r.max_concurrent_trials, ">= 0"),  # 0: as many as fit
        ("resources.max_failures", r.max_failures, ">= 0"),  # Tune would read -1 as "retry forever"
    ]
    if (f := e.finetune) is not None:
        rules += [("evaluate.finetune.image_size", f.image_size, ">= 8"),
                  ("evaluate.finetune.batch_size", f.batch_size, ">= 1"),
                  ("evaluate.finetune.lr", f.lr, "> 0"),
                  ("evaluate.finetune.warmup_steps", f.warmup_steps, ">= 0"),
                  ("evaluate.finetune.grad_clip", f.grad_clip, ">= 0"),
                  *[(f"evaluate.finetune.{k}", getattr(f, k), "> 0") for k in ("steps", "epochs", "examples")]]
    for key, value, rule in rules:
        if value is not None and not _RULES[rule](value):  # None: a duration not given
            raise ConfigError(f"{key} must be {rule}, got {value}")
    _check_split(cfg)


def _check_split(cfg: StudyConfig) -> None:
    """Batches are global: each of the N workers takes batch / N, and micro-batches are per worker."""
    n = cfg.resources.workers_per_trial
    parts = []
    for model in cfg.models:
        p = cfg.pretrain_for(model)
        parts.append(("pretrain", cfg.recipes.where(model), p.batch_size, p.micro_batch_size))
    parts = list(dict.fromkeys(parts))
    if (f := cfg.evaluate.finetune) is not None:
        parts.append(("evaluate.finetune", "", f.batch_size, f.micro_batch_size))
    for key, recipes, batch, micro in parts:
        if batch % n:
            raise ConfigError(f"{key}.batch_size={batch}{recipes} does not divide among "
                              f"resources.workers_per_trial={n} workers; use a multiple of {n}")
        if micro is not None and not 0 < micro <= batch // n:
            raise ConfigError(f"{key}.micro_batch_size={micro}{recipes} must be in (0, {batch // n}], a worker's part "
                              f"of the batch ({batch} / {n})")


def pipe_commands(cfg: StudyConfig) -> list[str]:
    """Every shell command the grid's `pipe:` URLs run, brace-expanded as the shard reader expands them.

    A grid file is code: webdataset runs whatever follows `pipe:` in a shell when it opens a shard. This lists
    those commands from `data.pretrain` and each `downstream` entry (`urls` and `test_urls`) so a person can
    review them before anything runs.

    Args:
        cfg: a loaded study.

    Returns:
        The commands without their `pipe:` prefix, one per shard, each once, in the order the grid gives them.
    """
    commands: list[str] = []
    for src in (cfg.data.pretrain, *cfg.downstream):
        for urls in (src.urls, src.test_urls):
            commands += [url.removeprefix("pipe:") for url in expand_urls(urls or "") if url.startswith("pipe:")]
    return list(dict.fromkeys(commands))


def relative_paths(cfg: StudyConfig) -> list[tuple[str, str]]:
    """(key, value) of every local path of the grid given relative: `data.cache_dir` (or VITSCALE_CACHE), each
    source's `root` and `test_root`, and each `;`-separated local shard spec of its `urls` and `test_urls`."""
    import os

    out = []
    if cfg.data.cache_dir and not os.path.isabs(os.path.expanduser(cfg.data.cache_dir)):
        out.append(("data.cache_dir", cfg.data.cache_dir))
    elif not cfg.data.cache_dir and not os.path.isabs(os.path.expanduser(os.environ.get("VITSCALE_CACHE", "/"))):
        out.append(("VITSCALE_CACHE", os.environ["VITSCALE_CACHE"]))
    keys = ["data.pretrain", *(f"downstream[{i}]" for i in range(len(cfg.downstream)))]
    for key, src in zip(keys, (cfg.data.pretrain, *cfg.downstream), strict=True):
        for name in ("root", "test_root", "urls", "test_urls"):
            for spec in (getattr(src, name) or "").split(";") if name.endswith("urls") else [getattr(src, name)]:
                spec = (spec or "").strip()
                if spec and is_local(spec) and not os.path.isabs(os.path.expanduser(spec)):
                    out.append((f"{key}.{name}", spec))
    return out


def pipe_specs(cfg: StudyConfig) -> dict[str, int]:
    """The grid's `pipe:` specs as written (each `;`-separated part of `urls` and `test_urls`, without `pipe:`,
    brace ranges unexpanded), each once, with how many shell commands it expands to: what `pipe_commands` lists,
    in as many lines as the grid file has specs."""
    specs: dict[str, int] = {}
    for src in (cfg.data.pretrain, *cfg.downstream):
        for urls in (src.urls, src.test_urls):
            for spec in (urls or "").split(";"):
                if spec.strip().startswith("pipe:"):
                    specs[spec.strip().removeprefix("pipe:")] = len(expand_urls(spec))
    return specs


def grid_point(cfg: StudyConfig, model: str, subset_size: int, seed: int) -> GridPoint:
    """One grid point with its planned examples seen and forward FLOPs (no data touched, no weights)."""
    src, recipe = cfg.data.pretrain, cfg.pretrain_for(model)
    steps = recipe.total_steps(subset_size)
    return GridPoint(point_id(cfg, model, subset_size, seed), model, models.get_spec(model).family, subset_size,
                     seed, steps, steps * recipe.batch_size,
                     models.forward_flops(model, src.image_size, src.num_classes, models.ModelOptions.of(recipe)))


def expand(cfg: StudyConfig) -> list[GridPoint]:
    """model x subset x seed."""
    return [grid_point(cfg, *key) for key in itertools.product(cfg.models, cfg.data.subsets, cfg.seeds)]

"""The study's typed config (grid YAML + dotted overrides) and its expansion into grid points."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pipelines import models
from pipelines.config import ConfigError, apply_overrides, from_dict
from pipelines.data import SourceConfig, default_cache_dir
from pipelines.data.stream import LoaderConfig
from pipelines.downstream import EvaluateConfig
from pipelines.pretrain import PretrainConfig
from study.identity import point_id


@dataclass(frozen=True)
class DataConfig:
    pretrain: SourceConfig
    subsets: tuple[int, ...]  # numbers of examples; each subset contains the smaller ones
    cache_dir: str = ""  # where generated shards live; default $VITSCALE_CACHE or ~/.cache/vit-scaling
    loader: LoaderConfig = field(default_factory=LoaderConfig)  # streaming pretraining data from shards


@dataclass(frozen=True)
class Resources:
    cpus_per_trial: float = 1
    gpus_per_trial: float = 0
    max_concurrent_trials: int = 0  # 0: as many as the resources allow
    max_failures: int = 2  # Tune restarts a crashed trial this often, from its newest checkpoint


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

    @property
    def cache_dir(self) -> Path:
        return Path(self.data.cache_dir).expanduser() if self.data.cache_dir else default_cache_dir()


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
    if not path.is_file():
        raise ConfigError(f"grid file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of study keys at the top level")
    cfg = from_dict(StudyConfig, apply_overrides(data, overrides or []))
    validate(cfg)
    return cfg


def validate(cfg: StudyConfig) -> None:
    """Checks that need more than one key; all before any work starts."""
    if not cfg.models or not cfg.seeds or not cfg.data.subsets or not cfg.downstream:
        raise ConfigError("models, seeds, data.subsets and downstream must each list at least one entry")
    specs = [models.get_spec(name) for name in cfg.models]
    subsets = cfg.data.subsets
    if min(subsets) <= 0 or list(subsets) != sorted(set(subsets)):
        raise ConfigError(f"data.subsets must be increasing positive sizes, got {list(subsets)}")
    if max(subsets) > cfg.data.pretrain.size:
        raise ConfigError(f"data.subsets: {max(subsets)} examples asked, but data.pretrain holds only "
                          f"{cfg.data.pretrain.size}")
    names = [task.label for task in cfg.downstream]
    if len(set(names)) != len(names) or any("/" in n for n in names):
        raise ConfigError(f"downstream task names must be unique and contain no '/', got {names}")
    for task in cfg.downstream:
        per_class = task.size // task.num_classes
        if task.test_size <= 0:
            raise ConfigError(f"downstream '{task.label}': test_size must be > 0 (it is the evaluation split)")
        if cfg.evaluate.fewshot and per_class < max(cfg.evaluate.fewshot.shots):
            raise ConfigError(f"downstream '{task.label}': {max(cfg.evaluate.fewshot.shots)}-shot needs that "
                              f"many examples per class, size {task.size} gives {per_class}")
    for spec in specs:
        patch = spec.patch
        sizes = [("data.pretrain.image_size", cfg.data.pretrain.image_size)]
        if cfg.evaluate.finetune:
            sizes.append(("evaluate.finetune.image_size", cfg.evaluate.finetune.image_size))
        for key, size in sizes:
            if patch and size % patch:
                raise ConfigError(f"{key}={size} is not a multiple of {spec.name}'s patch size {patch}")


def grid_point(cfg: StudyConfig, model: str, subset_size: int, seed: int) -> GridPoint:
    """One grid point with its planned examples seen and forward FLOPs (no data touched, no weights)."""
    src = cfg.data.pretrain
    steps = cfg.pretrain.total_steps(subset_size)
    return GridPoint(point_id(cfg, model, subset_size, seed), model, models.get_spec(model).family, subset_size,
                     seed, steps, steps * cfg.pretrain.batch_size,
                     models.forward_flops(model, src.image_size, src.num_classes))


def expand(cfg: StudyConfig) -> list[GridPoint]:
    """model x subset x seed."""
    return [grid_point(cfg, *key) for key in itertools.product(cfg.models, cfg.data.subsets, cfg.seeds)]

"""Evaluation of a pretrained model: the rows of the evaluations table (`pipelines.evaluations`) that a study
enables, each a module whose `measure` returns typed `Measurement`s (eval, dataset, shots, metric, value, spread),
the records the results table is built from."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines import data, distributed, evaluations, models
from pipelines.config import ConfigError, from_dict, to_dict
from pipelines.data import SourceConfig
from pipelines.data.reader import DataError
from pipelines.data.stream import ShardSubset
from pipelines.evaluations import Evaluation
from pipelines.metrics import infer, rank_part
from pipelines.runtime import Runtime

Curve = Callable[[str, int, dict[str, float]], None]  # (metric prefix, step, per-epoch values)
Keep = Callable[[str, bytes], None]  # (file name, contents): a file an evaluation made, for the point's storage


class EvaluateConfig:
    """`evaluate:`, one section per row of the evaluations table: `evaluate.<name>` is that evaluation's config, or
    `null` to switch it off; a name left out takes its module's DEFAULT. Frozen, like every config."""

    __slots__ = ("sections",)

    def __init__(self, **sections: Any):
        rows = {row.name: row for row in evaluations.TABLE}
        if unknown := sorted(set(sections) - set(rows)):
            raise ConfigError(f"unknown evaluation '{unknown[0]}'; valid: {', '.join(rows)}")
        chosen = tuple((row, sections[row.name] if row.name in sections else row.load().DEFAULT)
                       for row in rows.values())
        object.__setattr__(self, "sections", chosen)

    @classmethod
    def from_config(cls, data: Any, where: str) -> EvaluateConfig:
        """Parse the YAML mapping, each section by its module's `Config`; unknown names fail naming the valid ones."""
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a mapping of evaluations, got {data!r}")
        rows = {row.name: row for row in evaluations.TABLE}
        if unknown := sorted(set(data) - set(rows)):
            raise ConfigError(f"unknown key '{where}.{unknown[0]}'; valid keys here: {', '.join(rows)}")
        sections = {}
        for name, value in data.items():
            config = rows[name].load().Config
            if value is None or isinstance(value, config):
                sections[name] = value
            elif isinstance(value, dict):
                sections[name] = from_dict(config, value, f"{where}.{name}")
            else:
                raise ConfigError(f"{where}.{name}: expected a mapping of {config.__name__} fields or null, "
                                  f"got {value!r}")
        return cls(**sections)

    def to_config(self) -> dict:
        return {row.name: to_dict(cfg) for row, cfg in self.sections}

    def enabled(self) -> tuple[tuple[Evaluation, Any], ...]:
        """(row, config) of every evaluation that is switched on, in the table's order."""
        return tuple((row, cfg) for row, cfg in self.sections if cfg is not None)

    def __getattr__(self, name: str) -> Any:
        for row, cfg in object.__getattribute__(self, "sections"):
            if row.name == name:
                return cfg
        raise AttributeError(f"no evaluation '{name}'; valid: {', '.join(evaluations.names())}")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("EvaluateConfig is frozen")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EvaluateConfig) and self.sections == other.sections

    def __hash__(self) -> int:
        return hash(self.sections)

    def __repr__(self) -> str:
        return f"EvaluateConfig({', '.join(f'{row.name}={cfg!r}' for row, cfg in self.sections)})"

    def __getstate__(self) -> tuple:
        return self.sections

    def __setstate__(self, state: tuple) -> None:
        object.__setattr__(self, "sections", state)


@dataclass(frozen=True)
class Measurement:
    """One number a trial measured. `spread` is the standard deviation over repeats where there are some."""

    eval: str  # a name of the evaluations table
    dataset: str  # the downstream task, or "pretrain" (the pretraining source)
    shots: int | None
    metric: str
    value: float
    spread: float | None = None

    @property
    def key(self) -> str:
        """Its MLflow metric name (display only: the results table is built from the records, not from names)."""
        name = f"{self.shots}shot_{self.metric}" if self.shots is not None else self.metric
        return f"{self.eval}/{self.dataset}/{name}"


@dataclass(frozen=True)
class Pretrained:
    """The model under evaluation: `module` (frozen, on the device) and its weights `state`."""

    name: str
    module: torch.nn.Module
    state: dict[str, torch.Tensor]
    image_size: int  # the pretraining resolution: features and diagnostics are taken there
    source: data.Prepared | None = None  # the pretraining source (evaluations that need its images)
    options: models.ModelOptions = models.NO_OPTIONS  # the knobs it was pretrained with (fine-tuning rebuilds it)

    @property
    def family(self) -> str:
        """Its row in `pipelines.families` (which diagnostics apply)."""
        return models.get_spec(self.name).family


@dataclass
class Inputs:
    """What one evaluation measures on one dataset, computed when it asks (features and splits once per task)."""

    eval: str
    dataset: str
    task: SourceConfig | None  # None: the pretraining source
    model: Pretrained
    runtime: Runtime
    cache: dict = field(default_factory=dict)  # shared by the evaluations of one frozen model
    on_curve: Curve | None = None
    on_file: Keep | None = None

    def measurement(self, metric: str, value: float, shots: int | None = None,
                    spread: float | None = None) -> Measurement:
        """A measurement of this evaluation on this dataset (the one place a measurement gets its evaluation)."""
        return Measurement(self.eval, self.dataset, shots, metric, float(value), spread)

    def splits(self) -> tuple[ShardSubset, ShardSubset]:
        """The task's train and test splits, left in their shards."""
        key = ("splits", self.dataset)
        if key not in self.cache:
            self.cache[key] = task_splits(self.task, self.runtime.cache_dir, self.runtime.index_root)
        return self.cache[key]

    def features(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Frozen pre-logit features and labels of the train and test splits, at the pretraining resolution:
        x_train, y_train, x_test, y_test (extracted once per task and model, batch by batch from the shards)."""
        key = ("features", self.dataset, self.model.image_size)
        if key not in self.cache:
            self.cache[key] = tuple(features(self.model.module, split, self.model.image_size, self.runtime.device,
                                             self.runtime.loader.max_bad_fraction) for split in self.splits())
        (x_train, y_train), (x_test, y_test) = self.cache[key]
        return x_train, y_train, x_test, y_test

    def pretrain_images(self, n: int) -> np.ndarray:
        """The first `n` images (uint8 [n, H, W, 3]) of the pretraining source's held-out split (train if none)."""
        source = self.model.source
        index = source.index("test" if "test" in source.shards else "train")
        first = ShardSubset(index, np.arange(min(n, len(index)), dtype=np.int64))  # a fixed slice, read by offset
        return data.load(first, self.model.image_size, max_bad_fraction=self.runtime.loader.max_bad_fraction).images

    def curve(self, step: int, values: dict[str, float]) -> None:
        """Per-epoch values at `step`, logged under `<eval>/<dataset>/`."""
        if self.on_curve is not None:
            self.on_curve(f"{self.eval}/{self.dataset}", step, values)

    def keep(self, name: str, contents: bytes) -> None:
        """A file this evaluation made, kept with the point (its storage folder)."""
        if self.on_file is not None:
            self.on_file(name, contents)


def run(ev: EvaluateConfig, model: Pretrained, tasks: tuple[SourceConfig, ...], runtime: Runtime,
        kinds: tuple[str, ...] | None = None, on_curve: Curve | None = None, on_file: Keep | None = None,
        cache: dict | None = None) -> list[Measurement]:
    """Run the enabled evaluations named in `kinds` (default: all enabled), in the table's order.

    A per-task evaluation runs on every task of `tasks`; one on the pretraining images runs once, on the main rank
    (a fixed batch, no collective). `cache` (a dict the caller keeps for one frozen `model`) carries the features
    across calls that run the evaluations one at a time. Memory holds features, never a split's pixels.
    """
    cache = {} if cache is None else cache
    out: list[Measurement] = []
    for row, cfg in ev.enabled():
        if kinds is not None and row.name not in kinds:
            continue
        module = row.load()
        if not row.per_task:
            if distributed.ranks().main:
                out += module.measure(cfg, Inputs(row.name, "pretrain", None, model, runtime, cache, on_curve,
                                                  on_file))
            continue
        for task in tasks:
            out += module.measure(cfg, Inputs(row.name, task.label, task, model, runtime, cache, on_curve, on_file))
    return out


def task_splits(task: SourceConfig, cache_dir: Path, index_root: Path | None = None
                ) -> tuple[ShardSubset, ShardSubset]:
    """A downstream task's train and test splits, left in their shards (indexed, not read)."""
    found = data.prepared(task, cache_dir, index_root)
    if "test" not in found.shards:
        raise DataError(f"downstream task '{task.label}' has no test split (give test_urls, test_root or test_size)")
    return found.subset("train"), found.subset("test")


def features(model: torch.nn.Module, split: ShardSubset, image_size: int, device: torch.device,
             max_bad_fraction: float = 0.001) -> tuple[np.ndarray, np.ndarray]:
    """Frozen pre-logit features [N, D] (float32) and labels [N], extracted batch by batch at `image_size` (in a
    process group, each rank extracts its part and every rank gets all of them, in the split's order)."""
    feats, labels = [], []
    for batch in data.split_batches(rank_part(split), image_size, max_bad_fraction=max_bad_fraction):
        feats.append(infer(model, batch.images, image_size, device, pre_logits=True))
        labels.append(batch.labels)
    return distributed.gather_rows(np.concatenate(feats)), distributed.gather_rows(np.concatenate(labels))

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

from pipelines import data, distributed, evaluations, linear_probe, models
from pipelines.config import ConfigError, UserError, from_dict, to_dict
from pipelines.data import SourceConfig, SourceIndex
from pipelines.data.index import key_hash
from pipelines.data.reader import DataError
from pipelines.data.stream import ShardSubset
from pipelines.evaluations import Evaluation
from pipelines.metrics import infer, rank_rows
from pipelines.runtime import Runtime

Curve = Callable[[str, int, dict[str, float]], None]  # (metric prefix, step, per-epoch values)
Keep = Callable[[str, bytes], None]  # (file name, contents): a file an evaluation made, for the point's storage
Steps = Callable[[int, int, dict[str, float]], None]  # (step, of steps, the last log window's values): progress


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
    whole_train: bool = False  # an enabled evaluation extracts the whole train split's features: share them
    on_progress: Steps | None = None

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

    def features(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
        """Frozen pre-logit features and labels of the whole train and test splits, at the pretraining resolution:
        x_train, y_train, x_test, y_test, on the main rank (None elsewhere: the solves run there once)."""
        train, test = self._split_features("train"), self._split_features("test")
        return (*train[:2], *test[:2]) if train is not None else None

    def test_features(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Features and labels of the whole test split (main rank; None elsewhere)."""
        found = self._split_features("test")
        return found[:2] if found is not None else None

    def train_features(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """Features of the train split's `rows` (sorted) that could be read, and those rows (main rank; None
        elsewhere). Taken from the whole split's features where an enabled evaluation extracts them all
        (`whole_train`, or already extracted), else extracted for these rows alone."""
        if self.whole_train or self._key("train") in self.cache:
            found = self._split_features("train")
            if found is None:
                return None
            x, _, read = found
            at = np.minimum(np.searchsorted(read, rows), len(read) - 1)
            kept = read[at] == rows
            return x[at[kept]], rows[kept]
        train, _ = self.splits()
        found = self._extract(train.part(np.asarray(rows)))
        return (found[0], np.asarray(rows)[found[2]]) if found is not None else None

    def probe(self, cfg: linear_probe.LinearProbeConfig, num_classes: int) -> linear_probe.Fitted | None:
        """The linear probe (`linear_probe.fit`) of the whole train split's features, fitted once per task, model
        and settings (the linear-probe evaluation's and LP-FT's start are one fit where their settings agree); on
        the main rank, None elsewhere. Every rank calls it (the features are extracted by all ranks)."""
        found = self._split_features("train")
        if found is None:
            return None
        key = ("probe", self.dataset, self.model.image_size, cfg, num_classes)
        if key not in self.cache:
            self.cache[key] = linear_probe.fit(cfg, found[0], found[1], num_classes, self.runtime.seed,
                                               self.runtime.device)
        return self.cache[key]

    def _key(self, split: str) -> tuple:
        return ("features", self.dataset, self.model.image_size, split)

    def _split_features(self, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """(features, labels, rows read) of a whole split, extracted once per task and model (main rank)."""
        key = self._key(split)
        if key not in self.cache:
            self.cache[key] = self._extract(self.splits()[split == "test"])
        return self.cache[key]

    def _extract(self, split: ShardSubset) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        loader = self.runtime.loader
        return features(self.model.module, split, self.model.image_size, self.runtime.device,
                        loader.max_bad_fraction, loader.workers, self.runtime.precision)

    def pretrain_images(self, n: int) -> np.ndarray:
        """The readable ones of the first `n` images (uint8 [<= n, H, W, 3]) of the pretraining source's held-out
        split (train if none). A fixed slice for the diagnostics, which describe the model, not the data: an
        unreadable image there is skipped (up to half of them) rather than failing a point whose training and
        evaluations are done (the data's own budget, `max_bad_fraction`, is the training's and the evaluations')."""
        source = self.model.source
        index = source.index("test" if "test" in source.shards else "train")
        first = ShardSubset(index, np.arange(min(n, len(index)), dtype=np.int64))  # a fixed slice, read by offset
        bad = max(self.runtime.loader.max_bad_fraction, 0.5)
        return data.load(first, self.model.image_size, max_bad_fraction=bad).images

    def curve(self, step: int, values: dict[str, float]) -> None:
        """Per-epoch values at `step`, logged under `<eval>/<dataset>/`."""
        if self.on_curve is not None:
            self.on_curve(f"{self.eval}/{self.dataset}", step, values)

    def progress(self, step: int, steps: int, values: dict[str, float]) -> None:
        """Where this evaluation's training stands (`step` of `steps`; the loss and images/s of its last log
        window), for the console and the scheduler's status; not an MLflow metric (`curve` is)."""
        if self.on_progress is not None:
            self.on_progress(step, steps, values)

    def keep(self, name: str, contents: bytes) -> None:
        """A file this evaluation made, kept with the point (its storage folder)."""
        if self.on_file is not None:
            self.on_file(name, contents)


def run(ev: EvaluateConfig, model: Pretrained, tasks: tuple[SourceConfig, ...], runtime: Runtime,
        kinds: tuple[str, ...] | None = None, on_curve: Curve | None = None, on_file: Keep | None = None,
        cache: dict | None = None, on_progress: Steps | None = None) -> list[Measurement]:
    """Run the enabled evaluations named in `kinds` (default: all enabled), in the table's order.

    A per-task evaluation runs on every task of `tasks`; one on the pretraining images runs once, on the main rank
    (a fixed batch, no collective). `cache` (a dict the caller keeps for one frozen `model`) carries the features
    across calls that run the evaluations one at a time. Memory holds features, never a split's pixels.
    `on_curve`, `on_file` and `on_progress`: where an evaluation's curves, files and training progress go
    (`Inputs.curve`, `.keep`, `.progress`).
    """
    cache = {} if cache is None else cache
    for task in tasks:
        check_task(ev, task, data.prepared(task, runtime.cache_dir, runtime.index_root).index())
    whole_train = any(row.needs == evaluations.FEATURES for row, _ in ev.enabled())  # enabled, run now or not
    out: list[Measurement] = []
    for row, cfg in ev.enabled():
        if kinds is not None and row.name not in kinds:
            continue
        module = row.load()
        if not row.per_task:
            if distributed.ranks().main:
                out += module.measure(cfg, Inputs(row.name, "pretrain", None, model, runtime, cache, on_curve,
                                                  on_file, on_progress=on_progress))
            continue
        for task in tasks:
            out += module.measure(cfg, Inputs(row.name, task.label, task, model, runtime, cache, on_curve, on_file,
                                              whole_train, on_progress))
    return out


def check_task(ev: EvaluateConfig, task: SourceConfig, index: SourceIndex) -> None:
    """Refuse, before any work, what the enabled evaluations cannot measure on a downstream task (its train split's
    `index`): a multi-label task (few-shot's one-hot targets, the probe's softmax and fine-tuning's loss take one
    class per sample), or more shots than its smallest class holds. Any number of classes is measured.

    Raises:
        UserError: one line naming the key.
    """
    per_task = [row.name for row, _ in ev.enabled() if row.per_task]
    if per_task and index.label_width > 1:
        raise UserError(f"evaluate.{per_task[0]}: downstream task '{task.label}' is multi-label (up to "
                        f"{index.label_width} classes per sample); the evaluations take one class per sample: use a "
                        f"single-label task, or set evaluate.{per_task[0]}=null")
    if (fewshot := ev.fewshot) is not None:
        short, n = fewest(index.label, task.num_classes)
        if max(fewshot.shots) > n:
            raise UserError(f"evaluate.fewshot.shots: {max(fewshot.shots)}-shot asked, but class {short} of downstream "
                            f"task '{task.label}' has only {n} training examples")


def fewest(labels, num_classes: int) -> tuple[int, int]:
    """The class with the fewest examples among those `labels` hold (the first of them), and its count: at most
    that many shots can be drawn of every class."""
    labels = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(labels[labels >= 0], minlength=num_classes)  # -1: a sample without a class
    short = int(np.flatnonzero(counts == counts[counts > 0].min())[0])
    return short, int(counts[short])


def task_splits(task: SourceConfig, cache_dir: Path, index_root: Path | None = None
                ) -> tuple[ShardSubset, ShardSubset]:
    """A downstream task's train and test splits, left in their shards (indexed, not read)."""
    found = data.prepared(task, cache_dir, index_root)
    if "test" not in found.shards:
        raise DataError(f"downstream task '{task.label}' has no test split (give test_urls, test_root or test_size)")
    return found.subset("train"), found.subset("test")


def features(model: torch.nn.Module, split: ShardSubset, image_size: int, device: torch.device,
             max_bad_fraction: float = 0.001, workers: int = 0, precision: str = "auto"
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Frozen pre-logit features [n, D] (float32), labels [n] and which of the split's rows they are ([n], sorted:
    unreadable samples are skipped), extracted batch by batch at `image_size` in `precision`. In a process group
    each rank extracts its part (decoded in `workers` loader processes), and the main rank gets all of them in the
    split's order (None on the other ranks)."""
    feats, labels, keys = [np.zeros(0, np.float32)], [np.zeros(0, np.int64)], []  # a rank may own no shard
    rows = rank_rows(split)
    mine = split.part(rows)
    for batch in data.split_batches(mine, image_size, max_bad_fraction=max_bad_fraction, workers=workers):
        feats.append(infer(model, batch.images, image_size, device, pre_logits=True, precision=precision))
        labels.append(batch.labels)
        keys += batch.keys
    read = rows_read(mine, keys) + rows.start
    found = [distributed.gather_to_main(np.concatenate(x[1:] or x)) for x in (feats, labels, [read])]
    return None if found[0] is None else tuple(found)


def rows_read(split: ShardSubset, keys: list[str]) -> np.ndarray:
    """Which rows of `split` the samples with `keys` (read in row order) are: all of them unless some were
    unreadable, then found by key hash."""
    if len(keys) == len(split):
        return np.arange(len(split), dtype=np.int64)
    return np.flatnonzero(np.isin(np.asarray(split.index.key[split.positions]), key_hash(keys)))

"""Downstream evaluation of a pretrained model on one task: linear few-shot, a linear probe and fine-tuning, as
typed `Measurement`s (eval, dataset, shots, metric, value, spread), the records the results table is built from."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipelines import data, distributed, fewshot, finetune, linear_probe
from pipelines.data import SourceConfig
from pipelines.data.reader import DataError
from pipelines.data.stream import LoaderConfig, ShardSubset
from pipelines.fewshot import FewshotConfig
from pipelines.finetune import FinetuneConfig
from pipelines.linear_probe import LinearProbeConfig
from pipelines.loop import Hooks
from pipelines.metrics import infer, rank_part
from pipelines.runtime import Runtime

KINDS = ("fewshot", "linear_probe", "finetune")  # each can be re-run alone when its config changes

Curve = Callable[[str, int, dict[str, float]], None]  # (metric prefix, step, per-epoch values)


@dataclass(frozen=True)
class EvaluateConfig:
    """Each evaluation runs on every downstream task; `null` switches one off."""

    fewshot: FewshotConfig | None = field(default_factory=FewshotConfig)
    linear_probe: LinearProbeConfig | None = field(default_factory=LinearProbeConfig)
    finetune: FinetuneConfig | None = field(default_factory=FinetuneConfig)
    diagnostics: bool = True  # Fig 7: patch-filter PCA, position-embedding similarity, attention distance
    diagnostic_batch: int = 128  # fixed images (the pretraining test split's first) for attention distances

    def enabled(self) -> tuple[str, ...]:
        return tuple(kind for kind in KINDS if getattr(self, kind) is not None)


@dataclass(frozen=True)
class Measurement:
    """One number a trial measured. `spread` is the standard deviation over repeats where there are some."""

    eval: str  # fewshot | linear_probe | finetune | diagnostic
    dataset: str
    shots: int | None
    metric: str
    value: float
    spread: float | None = None

    @property
    def key(self) -> str:
        """Its MLflow metric name (display only: the results table is built from the records, not from names)."""
        if self.eval == "diagnostic":
            return f"diag/{self.metric}"
        name = f"{self.shots}shot_{self.metric}" if self.shots is not None else self.metric
        return f"{self.eval}/{self.dataset}/{name}"


def run(ev: EvaluateConfig, task: SourceConfig, model_name: str, model: torch.nn.Module,
        state: dict[str, torch.Tensor], feature_size: int, cache_dir: Path, seed: int, device: torch.device,
        kinds: tuple[str, ...] | None = None, on_curve: Curve | None = None,
        progress: bool = False, loader: LoaderConfig | None = None,
        feature_cache: dict | None = None, index_root: Path | None = None) -> list[Measurement]:
    """Run the enabled evaluations named in `kinds` (default: all enabled) on `task`.

    Few-shot and the probe share one pass of frozen pre-logit features at `feature_size` (the pretraining
    resolution), extracted batch by batch from the shards; `feature_cache` (a dict the caller keeps for one frozen
    `model`) carries them across calls that run the kinds one at a time. Fine-tuning starts from `state` at its
    own resolution and streams its splits with `loader` (default: in the evaluating process). Memory holds the
    features, never a split's pixels.
    """
    kinds = tuple(k for k in (kinds or ev.enabled()) if getattr(ev, k) is not None)
    loader = loader or LoaderConfig(workers=0)
    name = task.label
    train, test = task_splits(task, cache_dir, index_root)
    out: list[Measurement] = []
    if "fewshot" in kinds or "linear_probe" in kinds:
        cache = {} if feature_cache is None else feature_cache
        key = (name, feature_size)
        if key not in cache:
            cache[key] = tuple(features(model, split, feature_size, device, loader.max_bad_fraction)
                               for split in (train, test))
        (x_train, y_train), (x_test, y_test) = cache[key]
    if "fewshot" in kinds:
        shots = fewshot.run(ev.fewshot, x_train, y_train, x_test, y_test, seed)
        out += [Measurement("fewshot", name, k, "top1", shots.top1[k], shots.top1_std[k]) for k in ev.fewshot.shots]
    if "linear_probe" in kinds:
        probe = linear_probe.run(ev.linear_probe, x_train, y_train, x_test, y_test, seed, device=device)
        out += [Measurement("linear_probe", name, None, "top1", probe.top1),
                Measurement("linear_probe", name, None, "macro_f1", probe.macro_f1)]
    if "finetune" in kinds:
        def curve(epoch: finetune.FinetuneEpoch) -> None:
            if on_curve is not None:
                on_curve(f"finetune/{name}", epoch.epoch, epoch.metrics())

        rt = Runtime(device, seed, cache_dir, index_root, loader, progress)
        ft = finetune.run(ev.finetune, model_name, state, train, test, task.num_classes, rt,
                          Hooks(on_epoch=curve, label=f"finetune {name}"))
        out += [Measurement("finetune", name, None, "top1", ft.top1),
                Measurement("finetune", name, None, "macro_f1", ft.macro_f1)]
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

"""Downstream evaluation of a pretrained model on one task: linear few-shot, a linear probe and fine-tuning, as
typed `Measurement`s (eval, dataset, shots, metric, value, spread), the records the results table is built from."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipelines import data, fewshot, finetune, linear_probe
from pipelines.data import SourceConfig
from pipelines.fewshot import FewshotConfig
from pipelines.finetune import FinetuneConfig
from pipelines.linear_probe import LinearProbeConfig
from pipelines.training import infer

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
        progress: bool = False) -> list[Measurement]:
    """Run the enabled evaluations named in `kinds` (default: all enabled) on `task`.

    Few-shot and the probe share one pass of frozen pre-logit features at `feature_size` (the pretraining
    resolution); fine-tuning starts from `state` at its own resolution.
    """
    kinds = tuple(k for k in (kinds or ev.enabled()) if getattr(ev, k) is not None)
    name = task.label
    shards = data.prepare(task, cache_dir, progress=False)
    train, test = data.load(shards["train"], task.image_size), data.load(shards["test"], task.image_size)
    out: list[Measurement] = []
    if "fewshot" in kinds or "linear_probe" in kinds:
        feats = [infer(model, split.images, feature_size, device, pre_logits=True) for split in (train, test)]
    if "fewshot" in kinds:
        shots = fewshot.run(ev.fewshot, feats[0], train.labels, feats[1], test.labels, seed)
        out += [Measurement("fewshot", name, k, "top1", shots.top1[k], shots.top1_std[k]) for k in ev.fewshot.shots]
    if "linear_probe" in kinds:
        probe = linear_probe.run(ev.linear_probe, feats[0], train.labels, feats[1], test.labels, seed)
        out += [Measurement("linear_probe", name, None, "top1", probe.top1),
                Measurement("linear_probe", name, None, "macro_f1", probe.macro_f1)]
    if "finetune" in kinds:
        def curve(metrics: dict) -> None:
            if on_curve is not None:
                on_curve(f"finetune/{name}", int(metrics["epoch"]),
                         {k: v for k, v in metrics.items() if k != "epoch"})

        ft = finetune.run(ev.finetune, model_name, state, train, test, task.num_classes, seed, device,
                          progress=progress, desc=f"finetune {name}", on_epoch=curve)
        out += [Measurement("finetune", name, None, "top1", ft.top1),
                Measurement("finetune", name, None, "macro_f1", ft.macro_f1)]
    return out

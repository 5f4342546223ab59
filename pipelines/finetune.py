"""Fine-tuning stage: the pretrained backbone with a new zero-initialised head, at a higher resolution than
pretraining (ViT position embeddings resampled by 2D interpolation), with the paper's fine-tuning recipe."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Literal

import numpy as np
import torch

from pipelines import models
from pipelines.data import ImageArrays
from pipelines.data.augment import Augment
from pipelines.training import (
    LoopSpec,
    MemoryBatches,
    duration_steps,
    evaluate,
    holdout,
    train_loop,
    warmup_decay,
)


@dataclass(frozen=True)
class FinetuneConfig:
    """ViT paper Appendix B.1.1: SGD with momentum 0.9, no weight decay, gradient clipping at norm 1,
    cosine decay after a short linear warm-up; the paper sweeps lr in {0.001, 0.003, 0.01, 0.03}."""

    image_size: int = 48
    steps: int | None = None
    epochs: float | None = None
    examples: int | None = None
    batch_size: int = 64
    lr: float = 0.01
    warmup_steps: int = 20
    grad_clip: float = 1.0
    precision: Literal["fp32", "bf16"] = "fp32"
    augment: Augment = field(default_factory=lambda: Augment(crop="translate", crop_padding=4, flip=False))
    val_fraction: float = 0.1  # minival carved from the train split for the per-epoch curves (0: none)

    def __post_init__(self):
        if sum(v is not None for v in (self.steps, self.epochs, self.examples)) > 1:
            raise ValueError("give at most one duration: steps, epochs or examples")
        if not 0 <= self.val_fraction < 1:
            raise ValueError("val_fraction must be in [0, 1)")

    def total_steps(self, dataset_size: int) -> int:
        if (self.steps, self.epochs, self.examples) == (None, None, None):
            return _hyper_rule_steps(dataset_size)
        return duration_steps(self.epochs, self.steps, self.examples, self.batch_size, dataset_size)


def _hyper_rule_steps(dataset_size: int) -> int:
    """BiT-HyperRule schedule length (Kolesnikov et al. 2020): 500 steps below 20k examples, 10k below
    500k, else 20k."""
    return 500 if dataset_size < 20_000 else 10_000 if dataset_size < 500_000 else 20_000


@dataclass
class FinetuneResult:
    top1: float
    macro_f1: float
    steps: int
    curves: list[dict]  # per epoch: train loss/top-1 and minival loss/top-1
    seconds: float


def split_minival(data: ImageArrays, fraction: float, seed: int) -> tuple[ImageArrays, ImageArrays | None]:
    """(train, minival): a seeded `fraction` of `data` held out for validation curves."""
    if fraction == 0:
        return data, None
    kept, held = holdout(len(data), fraction, seed, salt=777)
    pick = lambda idx: ImageArrays(data.images[idx], data.labels[idx])  # noqa: E731
    return pick(np.sort(kept)), pick(np.sort(held))


def run(cfg: FinetuneConfig, model_name: str, state: dict[str, torch.Tensor], train: ImageArrays,
        test: ImageArrays, num_classes: int, seed: int, device: torch.device, progress: bool = True,
        desc: str = "finetune", on_epoch: Callable[[dict], None] | None = None) -> FinetuneResult:
    """Fine-tune the pretrained `state` on `train` (less a minival); top-1 and macro-F1 (percent) on `test`."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    model = models.pretrained_for_task(model_name, state, num_classes, cfg.image_size).to(device)
    train, minival = split_minival(train, cfg.val_fraction, seed)
    steps = cfg.total_steps(len(train))
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(warmup_decay, total=steps, warmup=cfg.warmup_steps, decay="cosine"))
    spec = LoopSpec(steps=steps, batch_size=min(cfg.batch_size, len(train)), image_size=cfg.image_size,
                    grad_clip=cfg.grad_clip, precision=cfg.precision, seed=seed)
    curves: list[dict] = []

    def epoch_end(metrics: dict) -> None:
        point = {"epoch": metrics["epoch"], "train_loss": metrics["loss"], "train_top1": metrics["train_top1"]}
        if minival is not None:
            val = evaluate(model, minival, cfg.image_size, device)
            point.update(val_loss=val["loss"], val_top1=val["top1"])
        curves.append(point)
        if on_epoch is not None:
            on_epoch(point)

    batches = MemoryBatches(train, spec.batch_size, seed, cfg.augment)
    train_loop(model, batches, spec, optimizer, scheduler, device, on_epoch=epoch_end, desc=desc, progress=progress)
    result = evaluate(model, test, cfg.image_size, device)
    return FinetuneResult(result["top1"], result["macro_f1"], steps, curves, time.perf_counter() - start)

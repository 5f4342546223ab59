"""Fine-tuning stage: the pretrained backbone with a new zero-initialised head, at a higher resolution than
pretraining (ViT position embeddings resampled by 2D interpolation), with the paper's fine-tuning recipe."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from typing import Literal

import torch

from pipelines import models
from pipelines.data import ImageArrays
from pipelines.training import Augment, LoopSpec, duration_steps, infer, top1, train_loop, warmup_decay


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
    augment: Augment = field(default_factory=Augment)

    def __post_init__(self):
        if sum(v is not None for v in (self.steps, self.epochs, self.examples)) > 1:
            raise ValueError("give at most one duration: steps, epochs or examples")

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
    steps: int
    final: dict
    seconds: float


def run(cfg: FinetuneConfig, model_name: str, state: dict[str, torch.Tensor], train: ImageArrays,
        test: ImageArrays, num_classes: int, seed: int, device: torch.device, progress: bool = True,
        desc: str = "finetune") -> FinetuneResult:
    """Fine-tune the pretrained `state` on `train`; top-1 (percent) on `test`."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    model = models.pretrained_for_task(model_name, state, num_classes, cfg.image_size).to(device)
    steps = cfg.total_steps(len(train))
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(warmup_decay, total=steps, warmup=cfg.warmup_steps, decay="cosine"))
    spec = LoopSpec(steps=steps, batch_size=min(cfg.batch_size, len(train)), image_size=cfg.image_size,
                    grad_clip=cfg.grad_clip, augment=cfg.augment, precision=cfg.precision, seed=seed)
    final = train_loop(model, train, spec, optimizer, scheduler, device, desc=desc, progress=progress)
    accuracy = top1(infer(model, test.images, cfg.image_size, device), test.labels)
    return FinetuneResult(accuracy, steps, final, time.perf_counter() - start)

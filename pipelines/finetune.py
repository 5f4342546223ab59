"""Fine-tuning stage: the pretrained backbone with a new zero-initialised head, at a higher resolution than
pretraining (ViT position embeddings resampled by 2D interpolation), with the paper's fine-tuning recipe."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Literal

import numpy as np
import torch

from pipelines import distributed, downstream, linear_probe, models, perf
from pipelines.data import nested_subset
from pipelines.data.augment import Augment
from pipelines.data.stream import ShardSubset
from pipelines.loop import (
    EpochRecord,
    Hooks,
    LoopSpec,
    TrainingDiverged,
    duration_steps,
    streamed_batches,
    train_loop,
    warmup_decay,
)
from pipelines.metrics import evaluate, holdout_size
from pipelines.runtime import Runtime


@dataclass(frozen=True)
class FinetuneConfig:
    """ViT paper Appendix B.1.1: SGD with momentum 0.9, no weight decay, gradient clipping at norm 1,
    cosine decay after a short linear warm-up; the paper sweeps lr in {0.001, 0.003, 0.01, 0.03}."""

    image_size: int = 48
    steps: int | None = None
    epochs: float | None = None
    examples: int | None = None
    batch_size: int = 64
    lr: float | None = None  # a fixed learning rate; None: the sweep below
    lr_sweep: tuple[float, ...] = (0.001, 0.003, 0.01, 0.03)  # ViT paper B.1.1; the best on the minival is kept
    warmup_steps: int = 20
    grad_clip: float = 1.0
    micro_batch_size: int | None = None  # per worker: accumulate gradients over micro-batches of this size
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on CUDA, fp32 on a CPU (pipelines.perf)
    compile: bool | Literal["auto"] = "auto"  # torch.compile; auto: on CUDA only
    nonfinite_check_every: int = 25  # steps between host reads of the loss (a NaN/inf stops the run within these)
    log_every: int = 50  # steps between progress reports (`run`'s `on_steps`: loss, images/s), a host read each
    augment: Augment = field(default_factory=lambda: Augment(crop="translate", crop_padding=4, flip=False))
    val_fraction: float = 0.1  # minival carved from the train split for the per-epoch curves (0: none)
    minival_seed: int = 0  # which fixed slice is the minival (`split_minival`): one per task, not per point
    # The head's start: zero (the ViT paper's set-up), or the linear probe's solution on the same backbone's features
    # ("LP-FT", Kumar et al. 2022: the features are not distorted by gradients from a head that fits nothing yet).
    head_init: Literal["zero", "probe"] = "zero"

    def __post_init__(self):
        if sum(v is not None for v in (self.steps, self.epochs, self.examples)) > 1:
            raise ValueError("give at most one duration: steps, epochs or examples")
        if not 0 <= self.val_fraction < 1:
            raise ValueError("val_fraction must be in [0, 1)")
        if self.lr is None and (not self.lr_sweep or len(self.lr_sweep) > 1 and self.val_fraction == 0):
            raise ValueError("give lr, or an lr_sweep (chosen on the minival: val_fraction > 0)")
        if any(lr <= 0 for lr in self.learning_rates):
            raise ValueError("learning rates must be positive")
        if self.log_every <= 0:
            raise ValueError("log_every must be positive")

    @property
    def learning_rates(self) -> tuple[float, ...]:
        return (self.lr,) if self.lr is not None else self.lr_sweep

    def total_steps(self, dataset_size: int) -> int:
        if (self.steps, self.epochs, self.examples) == (None, None, None):
            return _hyper_rule_steps(dataset_size)
        return duration_steps(self.epochs, self.steps, self.examples, self.batch_size, dataset_size)


def _hyper_rule_steps(dataset_size: int) -> int:
    """BiT-HyperRule schedule length (Kolesnikov et al. 2020): 500 steps below 20k examples, 10k below
    500k, else 20k."""
    return 500 if dataset_size < 20_000 else 10_000 if dataset_size < 500_000 else 20_000


@dataclass(frozen=True)
class FinetuneEpoch:
    """One epoch of a fine-tuning run: its training loss and top-1, and the minival's where there is one."""

    epoch: int
    train_loss: float
    train_top1: float
    val_loss: float | None = None
    val_top1: float | None = None

    def metrics(self) -> dict[str, float]:
        """The epoch's row by metric name (the minival's only where there is one); `epoch` is its coordinate."""
        row = {"train_loss": self.train_loss, "train_top1": self.train_top1, "val_loss": self.val_loss,
               "val_top1": self.val_top1}
        return {name: value for name, value in row.items() if value is not None}


@dataclass
class FinetuneResult:
    top1: float
    macro_f1: float
    steps: int
    curves: list[FinetuneEpoch]  # per epoch of the chosen run
    seconds: float
    lr: float = 0.0  # the chosen learning rate
    val_top1: dict[float, float] = field(default_factory=dict)  # minival top-1 at the end of each swept run


def schedule(cfg: FinetuneConfig, task_size: int, world_size: int) -> tuple[int, int]:
    """(steps, global batch) of each run of the sweep on a task of `task_size` training examples, before the data
    is read (the dry run prices it): the train split less the minival, the batch capped at it, split among ranks."""
    train = task_size - (holdout_size(task_size, cfg.val_fraction) if cfg.val_fraction else 0)
    batch = max(world_size, min(cfg.batch_size, train) // world_size * world_size)
    return cfg.total_steps(train), batch


def split_minival(data: ShardSubset, fraction: float, seed: int) -> tuple[ShardSubset, ShardSubset | None]:
    """(train, minival): a fixed `fraction` of `data` held out for choosing the learning rate and for curves, and the
    rest (which never holds a minival row).

    Shards read by offset: the rows first in the index's seeded key order (`SourceIndex.order`, O(N) once per task
    and seed, stored beside the index), the same samples in every run and point, for any number of ranks or shard
    order. Shards that can only be streamed: whole shards in a seeded order of their names (`nested_subset`'s
    `shards` mode), so a minival pass streams those alone, not a tenth of every shard."""
    if fraction == 0:
        return data, None
    index, n_val = data.index, max(1, round(fraction * len(data)))
    inside = np.zeros(len(index), dtype=bool)
    inside[data.positions] = True
    if index.reads_rows:
        order = np.asarray(index.order(seed))
        held = np.sort(order[inside[order]][:n_val]).astype(np.int64)
    else:
        held = np.asarray(nested_subset(index, n_val, seed, mode="shards").positions)
        held = held[inside[held]]
    inside[held] = False
    return ShardSubset(index, np.flatnonzero(inside)), ShardSubset(index, held)


def run(cfg: FinetuneConfig, model_name: str, state: dict[str, torch.Tensor], train: ShardSubset, test: ShardSubset,
        num_classes: int, rt: Runtime, hooks: Hooks[FinetuneEpoch] | None = None,
        options: models.ModelOptions = models.NO_OPTIONS, head: ProbeHead | None = None,
        on_steps: Callable[[int, int, EpochRecord], None] | None = None) -> FinetuneResult:
    """Fine-tune the pretrained `state` on `train` (less a minival) at each of `cfg.learning_rates`,
    keep the run with the best minival top-1 and report its top-1 and macro-F1 (percent) on `test`.
    `options` are the knobs the model was pretrained with (a pre-logits layer is replaced by the linear head).
    With `head_init: probe`, `head` is the probe to start from where the caller already has it (the evaluation's,
    `probe_on_frozen_features`); None: fitted here (`probe_head`).

    The splits stay in their shards and are streamed (training through the exactly-once loader with `rt.loader`,
    evaluation batch by batch), so memory does not grow with them. `hooks.on_epoch` receives the chosen run's
    per-epoch curve once the sweep is decided; `hooks.label` names the progress bars (default: `finetune`).
    `on_steps` (rank 0) hears where the whole sweep stands, about every `cfg.log_every` steps and at each run's end:
    (steps run, of steps planned, the record of the last log window), a diverged run's unrun steps taken off the
    plan (`SweepSteps`).
    Fine-tuning keeps no checkpoints: a stop (`rt.should_stop`) raises TrainingStopped and a rerun starts over.
    """
    hooks = hooks or Hooks()
    if hooks.checkpoint_dir is not None or hooks.on_checkpoint is not None:
        raise ValueError("fine-tuning keeps no checkpoints")
    start = time.perf_counter()
    steps, batch = schedule(cfg, len(train), distributed.ranks().world_size)
    train, minival = split_minival(train, cfg.val_fraction, cfg.minival_seed)
    if cfg.head_init == "zero":
        head = None
    elif head is None:
        head = probe_head(model_name, state, train, num_classes, cfg.image_size, rt, options=options)
    best, val_top1, diverged = None, {}, None
    sweep = SweepSteps(steps, len(cfg.learning_rates), cfg.log_every, on_steps)
    for lr in cfg.learning_rates:
        label = f"{hooks.label or 'finetune'} lr={lr:g}"
        try:
            model, curves = _train(cfg, lr, (steps, batch), model_name, state, (train, minival), num_classes, rt,
                                   Hooks(label=label, on_log=sweep.logged), options, head)
        except TrainingDiverged as err:  # a rate too high for this task is a bad point of the sweep, not an error
            val_top1[lr], diverged = float("nan"), err
            sweep.ended(diverged=True)
            continue
        sweep.ended(diverged=False)
        val_top1[lr] = curves[-1].val_top1 if minival is not None else float("nan")
        if best is None or val_top1[lr] > val_top1[best[0]]:  # ties keep the earlier rate
            best = (lr, model, curves)
    if best is None:
        raise diverged
    lr, model, curves = best
    for point in curves if hooks.on_epoch is not None else ():
        hooks.on_epoch(point)
    result = evaluate(model, test, cfg.image_size, rt.device, rt.loader.max_bad_fraction, rt.loader.workers,
                      cfg.precision)
    return FinetuneResult(result["top1"], result["macro_f1"], steps, curves, time.perf_counter() - start, lr,
                          val_top1)


class SweepSteps:
    """Where a sweep of `runs` runs of `steps` steps each stands, for `on_steps(step, steps, record)`: the steps run
    so far (the finished runs' and this run's), of those planned, from which a diverged run's unrun steps are taken.
    A run's records (`Hooks.on_log`: every `log_every` steps and at epoch ends) reach `on_steps` at least `log_every`
    steps apart, and at the run's last step: each is a report to the driver, and epochs can be a few steps long."""

    def __init__(self, steps: int, runs: int, log_every: int, on_steps: Callable[[int, int, EpochRecord], None] | None):
        self.steps, self.log_every, self.on_steps = steps, log_every, on_steps
        self.done, self.planned = 0, steps * runs
        self.reached = self.told = 0  # this run's last logged step, and the last one told

    def logged(self, record: EpochRecord) -> None:
        self.reached = record.step
        if self.on_steps is not None and (record.step - self.told >= self.log_every or record.step == self.steps):
            self.told = record.step
            self.on_steps(self.done + record.step, self.planned, record)

    def ended(self, diverged: bool) -> None:
        """The run ended: all its steps run, or (diverged) those up to its last logged step."""
        ran = self.reached if diverged else self.steps
        self.done, self.planned = self.done + ran, self.planned - (self.steps - ran)
        self.reached = self.told = 0


@dataclass(frozen=True)
class ProbeHead:
    """A linear probe as a classifier head on raw pre-logit features: logits = features @ weight.T + bias."""

    weight: torch.Tensor  # [classes, features]
    bias: torch.Tensor  # [classes]
    l2: float  # the strength chosen on the probe's held-out slice
    val_top1: float  # the probe's top-1 (percent) on that slice

    @classmethod
    def of(cls, fitted: linear_probe.Fitted) -> ProbeHead:
        return cls(*(t.cpu() for t in fitted.raw()), fitted.l2, fitted.val_top1[fitted.l2])


# The probe LP-FT starts from: the linear-probe evaluation's default settings (also where the evaluation shares it).
LP_FT_PROBE = linear_probe.LinearProbeConfig()


def probe_head(model_name: str, state: dict[str, torch.Tensor], train: ShardSubset, num_classes: int,
               image_size: int, rt: Runtime, probe: linear_probe.LinearProbeConfig | None = None,
               options: models.ModelOptions = models.NO_OPTIONS) -> ProbeHead:
    """LP-FT's start: the linear probe of the pretrained backbone's frozen features of the fine-tune train split at
    the fine-tune resolution, fitted as the linear-probe evaluation fits it (`linear_probe.fit`: every l2 of
    `probe.l2_grid` on standardised features, the l2 chosen on a held-out `probe.val_fraction`, on the device),
    folded back to raw features. `probe`: default `LP_FT_PROBE`; `options`: the pretraining knobs (the features
    are those of the model fine-tuning starts from)."""
    probe = probe or LP_FT_PROBE
    model = models.pretrained_for_task(model_name, state, num_classes, image_size, options).to(rt.device)
    found = downstream.features(model, train, image_size, rt.device, rt.loader.max_bad_fraction, rt.loader.workers,
                                rt.precision)  # the frozen backbone's, as the evaluations' features
    # Extracted by every rank for its part, solved once on the main rank, the head handed to every rank.
    return distributed.on_main(
        lambda: ProbeHead.of(linear_probe.fit(probe, found[0], found[1], num_classes, rt.seed, rt.device)))


def probe_on_frozen_features(cfg: FinetuneConfig, image_size: int, options: models.ModelOptions) -> bool:
    """Whether LP-FT's probe is a probe of the frozen model's evaluation features (`downstream.Inputs.probe`): the
    fine-tune trains on the whole train split (no minival) at the pretraining resolution `image_size`, and the
    backbone it starts from has no pre-logits layer to drop, so `probe_head` would extract those very features."""
    return (cfg.head_init == "probe" and cfg.val_fraction == 0 and cfg.image_size == image_size
            and not options.pre_logits)


def _train(cfg: FinetuneConfig, lr: float, plan: tuple[int, int], model_name: str, state: dict[str, torch.Tensor],
           splits: tuple[ShardSubset, ShardSubset | None], num_classes: int, rt: Runtime,
           hooks: Hooks[EpochRecord], options: models.ModelOptions,
           head: ProbeHead | None = None) -> tuple[torch.nn.Module, list[FinetuneEpoch]]:
    """One fine-tuning run at learning rate `lr` on `splits` (train, minival) for `plan` (steps, global batch: each
    of N ranks takes batch / N), from a zero head or `head`: the model and its per-epoch curve. `hooks`: the run's
    progress-bar label and `on_log` (its per-epoch curve is collected here)."""
    (train, minival), (steps, batch), device = splits, plan, rt.device
    torch.manual_seed(rt.seed)
    model = models.pretrained_for_task(model_name, state, num_classes, cfg.image_size, options).to(device)
    if head is not None:
        set_head(model, head)
    perf.channels_last(model, device)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=0.0,
                                fused=perf.fused_optimizer(device))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(warmup_decay, total=steps, warmup=cfg.warmup_steps, decay="cosine"))
    spec = LoopSpec(steps=steps, batch_size=batch, image_size=cfg.image_size,
                    grad_clip=cfg.grad_clip, precision=cfg.precision,
                    micro_batch_size=cfg.micro_batch_size, nonfinite_check_every=cfg.nonfinite_check_every,
                    log_every=cfg.log_every, compile=perf.compile_enabled(cfg.compile, device))
    curves: list[FinetuneEpoch] = []

    def epoch_end(record: EpochRecord) -> None:
        val = {}
        if minival is not None:
            val = evaluate(model, minival, cfg.image_size, device, rt.loader.max_bad_fraction, rt.loader.workers,
                           cfg.precision)
        curves.append(FinetuneEpoch(record.epoch, record.loss, record.train_top1, val.get("loss"), val.get("top1")))

    batches = streamed_batches(train, cfg.image_size, spec.batch_size, cfg.augment, rt)
    train_loop(model, batches, spec, optimizer, scheduler, rt, replace(hooks, on_epoch=epoch_end))
    return model, curves


@torch.no_grad()
def set_head(model: torch.nn.Module, head: ProbeHead) -> None:
    """Load `head` into the model's classifier (a linear layer, or a ResNetV2's 1x1 convolution)."""
    classifier = model.get_classifier()
    classifier.weight.copy_(head.weight.reshape(classifier.weight.shape))
    classifier.bias.copy_(head.bias)

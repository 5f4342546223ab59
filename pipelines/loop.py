"""The optimisation loop pretraining and fine-tuning share: the duration helper and the LR schedule, the input
conversion, the losses, and `train_loop` (over batches streamed from shards, with clipping, checkpoints and
non-finite-loss detection), which hands its caller one typed `EpochRecord` per epoch and one every `log_every`
steps."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Generic, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from pipelines import checkpoint, distributed, perf
from pipelines.config import UserError
from pipelines.data.augment import Augment
from pipelines.data.stream import Batch, ShardStream, ShardSubset, StreamLoader
from pipelines.runtime import Runtime

if TYPE_CHECKING:
    from pipelines.selection import Selector


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite: the trial fails with this reason, the study carries on."""


class TrainingStopped(Exception):
    """`should_stop` asked the loop to stop (a signal): it stopped at a step boundary, checkpointed where it had a
    checkpoint folder; `step` is where it stopped, and a rerun resumes there. `stage`: the stage it stopped
    (pretraining, or an evaluation that trains, which keeps no checkpoint)."""

    def __init__(self, step: int, stage: str = "pretrain"):
        super().__init__(step, stage)  # its args: what pickling (a rank's error crossing Ray) rebuilds it from
        self.step, self.stage = step, stage

    def __str__(self) -> str:
        return f"stopped {self.where}"

    @property
    def where(self) -> str:
        return f"at step {self.step}" + ("" if self.stage == "pretrain" else f" of {self.stage}")


def duration_steps(epochs: float | None, steps: int | None, examples: int | None, batch_size: int,
                   dataset_size: int) -> int:
    """The one duration helper: a length given as `steps`, `epochs` or `examples` -> optimizer steps."""
    given = [name for name, v in (("epochs", epochs), ("steps", steps), ("examples", examples)) if v is not None]
    if len(given) != 1:
        raise UserError(f"give exactly one of epochs, steps, examples (got {', '.join(given) or 'none'})")
    if steps is not None:
        return int(steps)
    total = examples if examples is not None else epochs * dataset_size
    return max(1, math.ceil(total / batch_size))


def warmup_decay(step: int, total: int, warmup: int, decay: str) -> float:
    """LR multiplier: linear warm-up, then linear or cosine decay to zero (ViT paper, Appendix B.1)."""
    warmup = min(warmup, total // 2)  # a short run still spends most of its steps decaying
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 1.0 - progress if decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


def to_input(images: np.ndarray | torch.Tensor, image_size: int, device: torch.device,
             memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """uint8 [B,H,W,3] -> float [B,3,S,S] in [-1, 1] (the ViT/BiT normalisation), resized if needed.

    The layout change happens on the uint8 copy (a no-op for channels_last, whose layout HWC already is)."""
    x = torch.as_tensor(images).to(device, non_blocking=True).permute(0, 3, 1, 2)
    x = x.contiguous(memory_format=memory_format).float().div_(127.5).sub_(1.0)
    if x.shape[-1] != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
    return x


def streamed_batches(data: ShardSubset, image_size: int, batch_size: int, augment: Augment,
                     rt: Runtime) -> StreamLoader:
    """This rank's part of global batches of `data`, streamed from its shards, decoded and augmented by
    `rt.loader`'s workers, in an order fixed by `rt.seed`."""
    where, loader = distributed.ranks(), rt.loader
    stream = ShardStream(data, image_size, batch_size, augment, rt.seed, loader.shuffle_buffer, where.rank,
                         where.world_size, open_shards=loader.open_shards,
                         decoded_cache_mb=loader.decoded_cache_mb)
    return StreamLoader(stream, loader.workers, loader.max_bad_fraction, pin_memory=rt.device.type == "cuda")


@dataclass
class LoopSpec:
    steps: int
    batch_size: int
    image_size: int
    grad_clip: float
    loss: str = "softmax"  # or "sigmoid" (multi-label, as for ImageNet-21k)
    label_smoothing: float = 0.0
    precision: str = "fp32"  # auto | fp32 | bf16 | fp16 (`perf.resolve_precision`)
    micro_batch_size: int | None = None  # gradient accumulation when the batch does not fit
    checkpoint_every: int = 0  # steps; 0: only at the end
    keep_checkpoints: int = 2
    nonfinite_check_every: int = 25  # steps between reads of the loss from the device
    stop_check_every: int = 5  # steps between asking `should_stop` (all ranks at the same steps)
    log_every: int = 0  # steps between `hooks.on_log` records (one host read each); 0: at epoch ends only
    compile: bool = False  # torch.compile the step's module, after the DDP wrap (`perf.compile_model`)
    eval_every: int = 0  # steps between `hooks.select` calls (and at the end); 0: never


@dataclass(frozen=True)
class EpochRecord:
    """Training over a window ending at `step`: one epoch (`Hooks.on_epoch`), or the steps since the previous log
    point (`Hooks.on_log`). `metrics()` names its numbers: the names are made there alone."""

    epoch: int
    step: int
    examples_seen: int
    loss: float  # mean over the window's samples
    train_top1: float  # percent
    lr: float
    images_per_s: float  # epoch records: since the run (or its resumption) started; log records: over the window
    loader_wait_fraction: float  # share of the window's wall time spent waiting for the next batch
    skipped: dict[str, int] = field(default_factory=dict)  # unreadable samples skipped this epoch, by cause

    def metrics(self) -> dict[str, float]:
        """The epoch's row by metric name; `step` and `epoch` are its coordinates, not metrics."""
        return {"examples_seen": self.examples_seen, "loss": self.loss, "train_top1": self.train_top1,
                "lr": self.lr, "images_per_s": self.images_per_s, "loader_wait_fraction": self.loader_wait_fraction,
                **{f"skipped_{cause}": n for cause, n in self.skipped.items()}}


Record = TypeVar("Record")


@dataclass(frozen=True)
class Hooks(Generic[Record]):
    """What the caller of one training run hears from it along the way, and where the run keeps checkpoints.

    Attributes:
        on_epoch: called with each epoch's record (the stage's own type of record).
        on_log: called on rank 0 every `LoopSpec.log_every` steps and at each epoch end, with the record of the
            steps since the previous call (a long epoch still gives a curve, an ETA and system metrics).
        checkpoint_dir: resume from its newest checkpoint and write new ones there; None: no checkpoints.
        on_checkpoint: called with each checkpoint written (on rank 0).
        label: the progress bar's name; None: the stage's own.
        select: called on every rank every `LoopSpec.eval_every` steps and at the end, before that step's
            checkpoint, which keeps what it chose (`pipelines.selection.Selector`).
    """

    on_epoch: Callable[[Record], None] | None = None
    on_log: Callable[[EpochRecord], None] | None = None
    checkpoint_dir: Path | None = None
    on_checkpoint: Callable[[Path], None] | None = None
    label: str | None = None
    select: Selector | None = None


@dataclass(frozen=True)
class LoopResult:
    """The last epoch's record (None when a resumed run had no step left), and the steady-state timing of the run
    (its first steps, which include compilation and autotuning, left out)."""

    final: EpochRecord | None
    timed_steps: int = 0
    timed_seconds: float = 0.0
    waited_seconds: float = 0.0  # of timed_seconds, waiting for the next batch


def loss_fn(kind: str, logits: torch.Tensor, labels: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """Softmax cross-entropy on int labels [B], or the sigmoid loss on the multi-hot target (BCE summed over
    classes, averaged over samples, as big_vision's `sigmoid_xent`) of labels [B] or, multi-label, [B, K] padded
    with -1 (the multi-hot target is built here, on the device). Label smoothing makes either target
    (1 - smoothing) y + smoothing / classes (optax `smooth_labels`; torch's `label_smoothing` for softmax)."""
    if kind == "sigmoid":
        target = multi_hot(labels, logits.shape[-1], logits.dtype)
        if smoothing:
            target = target * (1 - smoothing) + smoothing / logits.shape[-1]
        return F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / logits.shape[0]
    if labels.ndim != 1:
        raise ValueError("softmax cross-entropy needs one label per sample; multi-label targets need loss 'sigmoid'")
    return F.cross_entropy(logits, labels, label_smoothing=smoothing)


def multi_hot(labels: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, C] target: 1 at each sample's classes. `labels` is [B], or [B, K] padded with -1."""
    labels = labels.reshape(len(labels), -1)
    spare = torch.where(labels >= 0, labels, num_classes)  # padding goes to an extra column, dropped below
    target = torch.zeros(len(labels), num_classes + 1, dtype=dtype, device=labels.device)
    return target.scatter_(1, spare, 1.0)[:, :num_classes]


def hits(predicted, labels):
    """Per sample, whether the top-1 prediction is right (numpy or torch): its label, or, multi-label (labels
    [N, K] padded with -1), any of its classes. Training top-1 and `metrics.top1` both count with it."""
    return predicted == labels if labels.ndim == 1 else (labels == predicted[:, None]).any(-1)


class _Sums:
    """Loss, correct-prediction and sample sums kept on the device (no host read per step), with the one read at
    log points: summed over ranks, so every rank sees the same numbers and stops together on a non-finite loss."""

    def __init__(self, device: torch.device, saved: list | None = None, step: int = 0, mark: list | None = None):
        loss, correct, count = saved or (0.0, 0, 0)
        self.device = device
        self.values = torch.tensor([loss, correct, count], dtype=torch.float64, device=device)
        self.local = torch.zeros(2, dtype=torch.float64, device=device)  # since the last read, this rank only
        self.local_count = 0
        self.checked = step  # the last step whose loss was read and finite
        # the epoch's sums at the previous log point (a resumed run's first window starts where the saved one did)
        self.mark = list(mark if mark is not None else saved or (0.0, 0, 0))

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """A (micro-)batch's loss and correct top-1 predictions; multi-label (labels [B, K], -1 padded), a top-1
        prediction is correct when it is any of the sample's classes."""
        correct = hits(logits.argmax(-1), labels).sum()
        self.local += torch.stack((loss.detach().double() * len(labels), correct.double()))
        self.local_count += len(labels)

    def read(self, step: int, desc: str) -> list:
        """[loss sum, correct, count] over all ranks on the host; raises TrainingDiverged if a loss since the last
        read was not finite (on every rank alike)."""
        count = torch.tensor([float(self.local_count)], dtype=torch.float64, device=self.device)
        self.values += distributed.all_reduce_sum(torch.cat((self.local, count)))
        self.local.zero_()
        self.local_count = 0
        loss, correct, count = self.values.tolist()
        if not math.isfinite(loss):
            raise TrainingDiverged(f"{desc}: loss became {loss} between step {self.checked + 1} and {step}; lower "
                                   f"the learning rate or check the data")
        self.checked = step
        return [loss, int(correct), int(count)]

    def window(self, totals: list) -> list:
        """[loss sum, correct, count] since the previous log point (or the epoch's start), from `read`'s totals."""
        since = [now - then for now, then in zip(totals, self.mark, strict=True)]
        self.mark = totals
        return since

    def reset(self) -> None:
        self.values.zero_()
        self.mark = [0.0, 0, 0]


class _Timer:
    """Wall time per epoch (for the per-epoch records) and over the steady-state window of the run: from step
    `first + warm-up` to the end, bracketed by device synchronisations (two per run)."""

    def __init__(self, device: torch.device, step: int, total: int):
        self.device, self.start_step, self.start = device, step, time.perf_counter()
        self.epoch_start, self.epoch_waited = self.start, 0.0
        self.log_start, self.log_step, self.log_waited = self.start, step, 0.0
        self.window_step = step + min(5, (total - step) // 4)  # compilation and autotuning happen before it
        self.window_start, self.window_waited = None, 0.0

    def at_step(self, step: int) -> None:
        if step == self.window_step:
            perf.synchronize(self.device)
            self.window_start, self.window_waited = time.perf_counter(), 0.0

    def next_batch(self, batches: Iterator[Batch]) -> Batch:
        tick = time.perf_counter()
        batch = next(batches)
        waited = time.perf_counter() - tick
        self.epoch_waited += waited
        self.window_waited += waited
        self.log_waited += waited
        return batch

    def exclude(self, seconds: float) -> None:
        """Leave `seconds` spent off the training path (an evaluation) out of every clock: images/s and MFU stay
        the training's."""
        self.start += seconds
        self.epoch_start += seconds
        self.log_start += seconds
        if self.window_start is not None:
            self.window_start += seconds

    def epoch_record(self, epoch: int, step: int, batch_size: int, totals: list, lr: float,
                     skipped: dict[str, int]) -> EpochRecord:
        now = time.perf_counter()
        loss, correct, count = totals
        record = EpochRecord(epoch, step, step * batch_size, loss / max(count, 1), 100.0 * correct / max(count, 1),
                             lr, (step - self.start_step) * batch_size / max(now - self.start, 1e-9),
                             self.epoch_waited / max(now - self.epoch_start, 1e-9), dict(skipped))
        self.epoch_waited = 0.0
        return record

    def log_record(self, epoch: int, step: int, batch_size: int, window: list, lr: float,
                   skipped: dict[str, int]) -> EpochRecord:
        """The record of the steps since the previous log point; its clock restarts."""
        now = time.perf_counter()
        loss, correct, count = window
        seconds = max(now - self.log_start, 1e-9)
        record = EpochRecord(epoch, step, step * batch_size, loss / max(count, 1), 100.0 * correct / max(count, 1),
                             lr, (step - self.log_step) * batch_size / seconds, self.log_waited / seconds,
                             dict(skipped))
        self.log_start, self.log_step, self.log_waited = now, step, 0.0
        return record

    def result(self, last: EpochRecord | None) -> LoopResult:
        if self.window_start is None:
            return LoopResult(last)
        perf.synchronize(self.device)
        seconds = time.perf_counter() - self.window_start
        end = last.step if last is not None else self.window_step
        return LoopResult(last, end - self.window_step, seconds, self.window_waited)


def train_loop(model: nn.Module, source: StreamLoader, spec: LoopSpec, optimizer: torch.optim.Optimizer,
               scheduler: torch.optim.lr_scheduler.LRScheduler, rt: Runtime,
               hooks: Hooks[EpochRecord] | None = None) -> LoopResult:
    """Run `spec.steps` optimizer steps over batches from `source` on `rt.device`; each epoch's `EpochRecord`
    goes to `hooks.on_epoch`, and a record of the steps since the previous one every `spec.log_every` steps and at
    each epoch end to `hooks.on_log` (on rank 0).

    With `hooks.checkpoint_dir`, resumes from its newest checkpoint (weights, optimizer, scheduler, RNG state and
    the step, which fixes the data position), so a killed run continues exactly where its last checkpoint left it.
    In a process group (`pipelines.distributed`) each rank runs this with its part of every batch: DDP averages
    the gradients, the metrics are summed over ranks, and rank 0 alone writes checkpoints.
    Nothing is read from the device inside the step: the loss is read every `spec.nonfinite_check_every` and
    `spec.log_every` steps, at epoch ends and before each checkpoint (so no checkpoint holds a diverged state).
    Every `spec.stop_check_every` steps it asks `rt.should_stop()` (any rank asking stops them all): then it
    checkpoints and raises TrainingStopped.

    Raises:
        TrainingDiverged: the loss became NaN/inf (within `spec.nonfinite_check_every` steps of it happening).
        TrainingStopped: `rt.should_stop()` said so.
    """
    hooks, device, where = hooks or Hooks(), rt.device, distributed.ranks()
    desc = hooks.label or "train"
    precision = perf.resolve_precision(spec.precision, device)
    perf.enable_tf32(device)
    autocast, scaler = perf.autocast(precision, device), perf.grad_scaler(precision, device)
    memory_format = perf.channels_last(model, device)
    if where.rank:  # this rank's dropout and drop-path masks are its own, not a copy of rank 0's
        torch.manual_seed(checkpoint.rank_seed(rt.seed, where.rank))
    step, epoch, saved, mark = _resume(hooks, model, optimizer, scheduler, scaler, device)
    sums = _Sums(device, saved, step, mark)
    timer = _Timer(device, step, spec.steps)
    last: EpochRecord | None = None
    batches = source.batches(step) if step < spec.steps else iter(())
    net = distributed.wrap(model, device)
    if spec.compile:
        perf.compile_model(net)  # in place: checkpoints and the weights keep the plain module's keys
    model.train()
    with tqdm(total=spec.steps, initial=step, desc=desc, unit="step", disable=not rt.progress or not where.main,
              mininterval=2) as bar:
        while step < spec.steps:
            timer.at_step(step)
            batch = timer.next_batch(batches)
            optimizer.zero_grad(set_to_none=True)
            _step(net, batch, spec, autocast, scaler, memory_format, device, sums)
            lr = scheduler.get_last_lr()[0]  # the rate this step takes (the scheduler then moves to the next one's)
            _update(model, optimizer, scheduler, scaler, spec.grad_clip)
            step += 1
            bar.update(1)
            epoch_done = batch.end_of_epoch or step == spec.steps
            epoch += epoch_done
            stop = (rt.should_stop is not None and step < spec.steps and step % spec.stop_check_every == 0
                    and distributed.any_rank(rt.should_stop()))
            save = hooks.checkpoint_dir is not None and (step == spec.steps or stop or
                                                        (spec.checkpoint_every and step % spec.checkpoint_every == 0))
            log = epoch_done or (spec.log_every and step % spec.log_every == 0)
            if save or log or step % spec.nonfinite_check_every == 0:
                totals = sums.read(step, desc)  # the one host read; raises if the loss is not finite
            if log:
                record = timer.log_record(epoch, step, spec.batch_size, sums.window(totals), lr,
                                          source.skipped(batch.epoch))
                if hooks.on_log is not None and where.main:  # the sums are reduced: every rank has these numbers
                    hooks.on_log(record)
                    model.train()  # on_log may have evaluated the model
            if hooks.select is not None and spec.eval_every and (step % spec.eval_every == 0 or step == spec.steps):
                tick = time.perf_counter()
                hooks.select(step)
                model.train()
                timer.exclude(time.perf_counter() - tick)
            generators = distributed.gather_to_main(checkpoint.rng_state(device)) if save else None  # every rank's
            if save and where.main:  # the sums of the epoch in progress after this step: none at an epoch's end
                _save(hooks, spec, {"step": step, "epoch": epoch, "sums": [0.0, 0, 0] if epoch_done else totals,
                                    "mark": [0.0, 0, 0] if epoch_done else sums.mark,
                                    "generators": torch.from_numpy(generators)}, model, optimizer, scheduler, scaler)
            if epoch_done:
                last = timer.epoch_record(epoch, step, spec.batch_size, totals, lr, source.skipped(batch.epoch))
                sums.reset()
                bar.set_postfix(loss=f"{last.loss:.3f}", acc=f"{last.train_top1:.1f}")
                if hooks.on_epoch is not None:
                    hooks.on_epoch(last)
                    model.train()  # on_epoch may have evaluated the model
                timer.epoch_start = time.perf_counter()
            if stop:  # after the epoch's record, where this step ended one
                distributed.barrier()  # rank 0's checkpoint is complete before any rank leaves
                raise TrainingStopped(step)
    return timer.result(last)


def _resume(hooks: Hooks, model: nn.Module, optimizer: torch.optim.Optimizer,
            scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler, device: torch.device
            ) -> tuple[int, int, list | None, list | None]:
    """(step, epoch, saved sums, the sums at the last log point) of the newest checkpoint in
    `hooks.checkpoint_dir`, its state (and what `hooks.select` kept) loaded; (0, 0, None, None) if none.

    Each rank's generators (CPU and GPU) continue where they were saved. With another number of ranks than saved,
    or from a checkpoint of older code (rank 0's CPU generator only), rank 0 continues rank 0's and the others keep
    their own seed's: the run cannot continue exactly then."""
    resume = checkpoint.latest(hooks.checkpoint_dir)
    if resume is None:
        return 0, 0, None, None
    where, own = distributed.ranks(), checkpoint.rng_state(device)
    loop = checkpoint.load(resume, model, optimizer, scheduler)  # restores rank 0's CPU generator
    generators = loop.get("generators")
    if generators is not None and (len(generators) == where.world_size or where.main):
        checkpoint.set_rng_state(generators[where.rank], device)
    elif where.rank:
        checkpoint.set_rng_state(own[0], device)
    if hooks.select is not None:
        hooks.select.load(resume)
    # Checkpoints of older code also hold "gen" (the RNG of the removed in-memory augmentation): ignored.
    if "scaler" in loop:
        scaler.load_state_dict(loop["scaler"])
    return loop["step"], loop["epoch"], loop["sums"], loop.get("mark")  # older checkpoints: no mark


def _save(hooks: Hooks, spec: LoopSpec, state: dict, model: nn.Module, optimizer: torch.optim.Optimizer,
          scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler) -> None:
    """Write a checkpoint of the loop `state` (step, epoch, sums) and tell `hooks.on_checkpoint`."""
    if scaler.is_enabled():
        state["scaler"] = scaler.state_dict()
    path = checkpoint.save(hooks.checkpoint_dir, state["step"], model, optimizer, scheduler, state,
                           spec.keep_checkpoints, hooks.select.save if hooks.select is not None else None)
    if hooks.on_checkpoint is not None:
        hooks.on_checkpoint(path)


def _step(model: nn.Module, batch: Batch, spec: LoopSpec, autocast, scaler: torch.amp.GradScaler,
          memory_format: torch.memory_format, device: torch.device, sums: _Sums) -> None:
    """Forward and backward of this rank's part of a batch (in micro-batches of `spec.micro_batch_size`, with the
    DDP gradient all-reduce only after the last), adding to the loss/accuracy sums on the device; no update, no
    host read. The batch comes augmented from the loader's workers."""
    n = len(batch.labels)
    micro = spec.micro_batch_size or n
    inputs = to_input(batch.images, spec.image_size, device, memory_format).contiguous(memory_format=memory_format)
    labels = batch.labels.to(device, non_blocking=True)
    starts = range(0, n, micro)
    for lo in starts:
        x, y = inputs[lo:lo + micro], labels[lo:lo + micro]
        last = lo == starts[-1]
        with contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync():
            with autocast:
                logits = model(x)
                loss = loss_fn(spec.loss, logits.float(), y, spec.label_smoothing)
            scaler.scale(loss if len(y) == n else loss * (len(y) / n)).backward()
        sums.add(loss, logits, y)


def _update(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
            scaler: torch.amp.GradScaler, grad_clip: float) -> None:
    """The update after a batch's backward: clip the (unscaled) gradients to `grad_clip` global norm, step the
    optimizer through the loss scaler, advance the LR schedule."""
    if grad_clip:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()

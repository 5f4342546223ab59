"""What pretraining and fine-tuning share: the duration helper, the LR schedule, batches from memory, the
optimisation loop with clipping and non-finite-loss detection, and batched inference (logits, features)."""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from pipelines import checkpoint
from pipelines.config import UserError
from pipelines.data import ImageArrays, split_batches
from pipelines.data.augment import Augment, augment_batch
from pipelines.data.stream import Batch, ShardSubset, StreamLoader


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite: the trial fails with this reason, the study carries on."""


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


def to_input(images: np.ndarray | torch.Tensor, image_size: int, device: torch.device) -> torch.Tensor:
    """uint8 [B,H,W,3] -> float [B,3,S,S] in [-1, 1] (the ViT/BiT normalisation), resized if needed."""
    x = torch.as_tensor(images).to(device, non_blocking=True).permute(0, 3, 1, 2).contiguous()
    x = x.float().div_(127.5).sub_(1.0)
    if x.shape[-1] != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
    return x


class MemoryBatches:
    """Training batches of a split held in memory: a seeded permutation per epoch, the final partial batch dropped
    (when there is more than one batch), augmented on the device by the training loop."""

    def __init__(self, data: ImageArrays, batch_size: int, seed: int, augment: Augment):
        self.data, self.batch_size, self.seed, self.augment = data, batch_size, seed, augment
        self.steps_per_epoch = max(1, len(data) // batch_size)

    def batches(self, start_epoch: int = 0, skip: int = 0) -> Iterator[Batch]:
        for epoch in itertools.count(start_epoch):
            order = np.random.default_rng([self.seed, epoch, 1]).permutation(len(self.data))
            for b in range(skip if epoch == start_epoch else 0, self.steps_per_epoch):
                idx = order[b * self.batch_size:(b + 1) * self.batch_size]
                yield Batch(torch.from_numpy(self.data.images[idx]), torch.from_numpy(self.data.labels[idx]), [],
                            epoch, b == self.steps_per_epoch - 1)

    def skipped(self, epoch: int) -> dict[str, int]:
        return {}


def holdout(n: int, fraction: float, seed: int, salt: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held-out) indices: a seeded `fraction` of `n` examples (at least one) held out for validation."""
    perm = np.random.default_rng([seed, salt]).permutation(n)
    n_val = max(1, int(round(fraction * n)))
    return perm[n_val:], perm[:n_val]


@dataclass
class LoopSpec:
    steps: int
    batch_size: int
    image_size: int
    grad_clip: float
    loss: str = "softmax"  # or "sigmoid" (multi-label, as for ImageNet-21k)
    precision: str = "fp32"
    seed: int = 0
    micro_batch_size: int | None = None  # gradient accumulation when the batch does not fit
    checkpoint_dir: Path | None = None  # resume from its newest checkpoint; write new ones there
    checkpoint_every: int = 0  # steps; 0: only at the end
    keep_checkpoints: int = 2


def loss_fn(kind: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if kind == "sigmoid":
        targets = F.one_hot(labels, logits.shape[-1]).to(logits.dtype)
        return F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / logits.shape[0]
    return F.cross_entropy(logits, labels)


def train_loop(model: nn.Module, source: MemoryBatches | StreamLoader, spec: LoopSpec,
               optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
               device: torch.device, on_epoch: Callable[[dict], None] | None = None, desc: str = "train",
               progress: bool = True, on_checkpoint: Callable[[Path], None] | None = None) -> dict:
    """Run `spec.steps` optimizer steps over batches from `source`, calling `on_epoch(metrics)` after each epoch.

    With `spec.checkpoint_dir`, resumes from its newest checkpoint (weights, optimizer, scheduler, RNG state and
    the position inside the epoch), so a killed run continues exactly where its last checkpoint left it.
    `loader_wait_fraction` is the share of the epoch's wall time spent waiting for the next batch.

    Raises:
        TrainingDiverged: the loss is NaN/inf (checked every step, before the update is applied).
    """
    gen = torch.Generator().manual_seed(spec.seed)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec.precision == "bf16")
    step, epoch, in_epoch, sums = 0, 0, 0, [0.0, 0, 0]
    resume = checkpoint.latest(spec.checkpoint_dir)
    if resume is not None:
        loop = checkpoint.load(resume, model, optimizer, scheduler)
        step, epoch, in_epoch, sums = loop["step"], loop["epoch"], loop["batch"], loop["sums"]
        gen.set_state(loop["gen"])
    start, start_step, epoch_start, waited = time.perf_counter(), step, time.perf_counter(), 0.0
    bar = tqdm(total=spec.steps, initial=step, desc=desc, unit="step", disable=not progress, mininterval=2)
    last: dict = {}
    batches = source.batches(epoch, in_epoch) if step < spec.steps else iter(())
    model.train()
    while step < spec.steps:
        tick = time.perf_counter()
        batch = next(batches)
        waited += time.perf_counter() - tick
        optimizer.zero_grad(set_to_none=True)
        _step(model, batch, spec, source.augment, gen, autocast, device, sums, desc, step + 1)
        if spec.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
        optimizer.step()
        scheduler.step()
        step, in_epoch = step + 1, in_epoch + 1
        bar.update(1)
        epoch_done = batch.end_of_epoch or step == spec.steps
        if epoch_done:
            epoch, in_epoch = epoch + 1, 0
        if spec.checkpoint_dir is not None and (step == spec.steps or
                                                (spec.checkpoint_every and step % spec.checkpoint_every == 0)):
            state = {"step": step, "epoch": epoch, "batch": in_epoch, "gen": gen.get_state(), "sums": list(sums)}
            path = checkpoint.save(spec.checkpoint_dir, step, model, optimizer, scheduler, state,
                                   spec.keep_checkpoints)
            if on_checkpoint is not None:
                on_checkpoint(path)
        if epoch_done:
            now = time.perf_counter()
            last = {"epoch": epoch, "step": step, "examples_seen": step * spec.batch_size,
                    "loss": sums[0] / max(sums[2], 1), "train_top1": 100.0 * sums[1] / max(sums[2], 1),
                    "lr": scheduler.get_last_lr()[0],
                    "images_per_s": (step - start_step) * spec.batch_size / max(now - start, 1e-9),
                    "loader_wait_fraction": waited / max(now - epoch_start, 1e-9)}
            last.update({f"skipped_{cause}": n for cause, n in source.skipped(batch.epoch).items()})
            sums, waited = [0.0, 0, 0], 0.0
            bar.set_postfix(loss=f"{last['loss']:.3f}", acc=f"{last['train_top1']:.1f}")
            if on_epoch is not None:
                on_epoch(last)
                model.train()  # on_epoch may have evaluated the model
            epoch_start = time.perf_counter()
    bar.close()
    return last


def _step(model: nn.Module, batch: Batch, spec: LoopSpec, augment: Augment | None, gen: torch.Generator,
          autocast, device: torch.device, sums: list, desc: str, step: int) -> None:
    """Forward and backward of one batch (in micro-batches), accumulating loss/accuracy sums; no update."""
    micro = spec.micro_batch_size or spec.batch_size
    n = len(batch.labels)
    inputs = to_input(batch.images, spec.image_size, device)
    if augment is not None:  # once per batch, so micro-batching does not change the augmentation
        inputs = augment_batch(inputs, augment, gen)
    labels = batch.labels.to(device, non_blocking=True)
    for lo in range(0, n, micro):
        x, y = inputs[lo:lo + micro], labels[lo:lo + micro]
        with autocast:
            logits = model(x)
            loss = loss_fn(spec.loss, logits.float(), y)
        value = loss.item()
        if not math.isfinite(value):
            raise TrainingDiverged(f"{desc}: loss became {value} at step {step}; lower the learning rate or check "
                                   f"the data")
        (loss * (len(y) / n)).backward()
        sums[0] += value * len(y)
        sums[1] += int((logits.argmax(-1) == y).sum())
        sums[2] += len(y)


@torch.no_grad()
def infer(model: nn.Module, images: np.ndarray, image_size: int, device: torch.device, batch_size: int = 256,
          pre_logits: bool = False) -> np.ndarray:
    """Logits, or pre-logit features (`pre_logits=True`: class token or global average pool, as trained)."""
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = to_input(images[start:start + batch_size], image_size, device)
        feats = model.forward_features(x)
        out.append(model.forward_head(feats, pre_logits=pre_logits).float().cpu())
    return torch.cat(out).numpy()


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    return 100.0 * float((logits.argmax(-1) == labels).mean())


def macro_f1(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Unweighted mean of per-class F1 (percent) over the classes present in labels or predictions."""
    scores = []
    for c in np.union1d(labels, predictions):
        tp = np.sum((predictions == c) & (labels == c))
        fp = np.sum((predictions == c) & (labels != c))
        fn = np.sum((predictions != c) & (labels == c))
        scores.append(2 * tp / (2 * tp + fp + fn))
    return 100.0 * float(np.mean(scores))


def classification_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The one metrics path: cross-entropy loss, top-1 and macro-F1 (percent) from logits."""
    logp = torch.log_softmax(torch.from_numpy(logits).double(), -1)
    loss = float(-logp[torch.arange(len(labels)), torch.from_numpy(labels)].mean())
    return {"loss": loss, "top1": top1(logits, labels), "macro_f1": macro_f1(logits.argmax(-1), labels)}


def evaluate(model: nn.Module, data: ImageArrays | ShardSubset, image_size: int, device: torch.device,
             max_bad_fraction: float = 0.001) -> dict[str, float]:
    """Loss, top-1 and macro-F1 of `model` on a split in memory or streamed from its shards batch by batch."""
    logits, labels = [], []
    for batch in split_batches(data, image_size, max_bad_fraction=max_bad_fraction):
        logits.append(infer(model, batch.images, image_size, device))
        labels.append(batch.labels)
    return classification_metrics(np.concatenate(logits), np.concatenate(labels))


def pick_device(gpus: float) -> torch.device:
    return torch.device("cuda") if gpus > 0 and torch.cuda.is_available() else torch.device("cpu")

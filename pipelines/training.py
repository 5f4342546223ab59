"""What pretraining and fine-tuning share: the duration helper, the LR schedule, batches from memory, the
optimisation loop with clipping and non-finite-loss detection, and batched inference (logits, features)."""

from __future__ import annotations

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
from pipelines.data import ImageArrays


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


@dataclass(frozen=True)
class Augment:
    """Pretraining/fine-tuning augmentation on in-memory batches: random translation (zero-pad + crop)
    and optional horizontal flip."""

    crop_padding: int = 4
    flip: bool = False


def to_input(images: np.ndarray, image_size: int, device: torch.device) -> torch.Tensor:
    """uint8 [B,H,W,3] -> float [B,3,S,S] in [-1, 1] (the ViT/BiT normalisation), resized if needed."""
    x = torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    if x.shape[-1] != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
    return x


def augment_batch(x: torch.Tensor, aug: Augment, gen: torch.Generator) -> torch.Tensor:
    if aug.crop_padding:
        p = aug.crop_padding
        size = x.shape[-1]
        padded = F.pad(x, (p, p, p, p))
        offsets = torch.randint(0, 2 * p + 1, (x.shape[0], 2), generator=gen).tolist()
        x = torch.stack([padded[i, :, dy:dy + size, dx:dx + size] for i, (dy, dx) in enumerate(offsets)])
    if aug.flip:
        flip = torch.rand(x.shape[0], generator=gen) < 0.5
        x = torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)
    return x


def epoch_batches(n: int, batch_size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Index batches for one pass over `n` examples (a final partial batch is dropped when n > batch)."""
    order = rng.permutation(n)
    full = max(1, n // batch_size)
    for b in range(full):
        yield order[b * batch_size:(b + 1) * batch_size]


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
    augment: Augment
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


def train_loop(model: nn.Module, data: ImageArrays, spec: LoopSpec, optimizer: torch.optim.Optimizer,
               scheduler: torch.optim.lr_scheduler.LRScheduler, device: torch.device,
               on_epoch: Callable[[dict], None] | None = None, desc: str = "train",
               progress: bool = True, on_checkpoint: Callable[[Path], None] | None = None) -> dict:
    """Run `spec.steps` optimizer steps over `data`, calling `on_epoch(metrics)` after each pass.

    With `spec.checkpoint_dir`, resumes from its newest checkpoint (weights, optimizer, scheduler, RNG states and
    the position inside the epoch), so a killed run continues exactly where its last checkpoint left it.

    Raises:
        TrainingDiverged: the loss is NaN/inf (checked every step, before the update is applied).
    """
    rng = np.random.default_rng([spec.seed, 1])
    gen = torch.Generator().manual_seed(spec.seed)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec.precision == "bf16")
    step, epoch, first_batch, sums = 0, 0, 0, [0.0, 0, 0]
    resume = checkpoint.latest(spec.checkpoint_dir)
    if resume is not None:
        loop = checkpoint.load(resume, model, optimizer, scheduler)
        step, epoch, first_batch, sums = loop["step"], loop["epoch"], loop["batch"], loop["sums"]
        rng.bit_generator.state = loop["epoch_rng"]
        gen.set_state(loop["gen"])
    micro = spec.micro_batch_size or spec.batch_size
    start, start_step = time.perf_counter(), step
    bar = tqdm(total=spec.steps, initial=step, desc=desc, unit="step", disable=not progress, mininterval=2)
    last: dict = {}
    while step < spec.steps:
        model.train()  # on_epoch may have evaluated the model
        epoch_rng = rng.bit_generator.state  # the epoch's order is drawn from here; a resume redraws it
        batches = list(epoch_batches(len(data), spec.batch_size, rng))
        for b in range(first_batch, len(batches)):
            idx = batches[b]
            optimizer.zero_grad(set_to_none=True)
            for chunk in np.split(idx, range(micro, len(idx), micro)):
                x = augment_batch(to_input(data.images[chunk], spec.image_size, device), spec.augment, gen)
                y = torch.from_numpy(data.labels[chunk]).to(device)
                with autocast:
                    logits = model(x)
                    loss = loss_fn(spec.loss, logits.float(), y)
                value = loss.item()
                if not math.isfinite(value):
                    raise TrainingDiverged(f"{desc}: loss became {value} at step {step + 1}; lower the learning "
                                           f"rate or check the data")
                (loss * (len(chunk) / len(idx))).backward()
                sums[0] += value * len(chunk)
                sums[1] += int((logits.argmax(-1) == y).sum())
                sums[2] += len(chunk)
            if spec.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            bar.update(1)
            if spec.checkpoint_dir is not None and (step == spec.steps or
                                                    (spec.checkpoint_every and step % spec.checkpoint_every == 0)):
                state = {"step": step, "epoch": epoch, "batch": b + 1, "epoch_rng": epoch_rng,
                         "gen": gen.get_state(), "sums": list(sums)}
                path = checkpoint.save(spec.checkpoint_dir, step, model, optimizer, scheduler, state,
                                       spec.keep_checkpoints)
                if on_checkpoint is not None:
                    on_checkpoint(path)
            if step >= spec.steps:
                break
        first_batch = 0
        epoch += 1
        elapsed = time.perf_counter() - start
        last = {"epoch": epoch, "step": step, "examples_seen": step * spec.batch_size,
                "loss": sums[0] / max(sums[2], 1), "train_top1": 100.0 * sums[1] / max(sums[2], 1),
                "lr": scheduler.get_last_lr()[0],
                "images_per_s": (step - start_step) * spec.batch_size / max(elapsed, 1e-9)}
        sums = [0.0, 0, 0]
        bar.set_postfix(loss=f"{last['loss']:.3f}", acc=f"{last['train_top1']:.1f}")
        if on_epoch is not None:
            on_epoch(last)
    bar.close()
    return last


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


def evaluate(model: nn.Module, data: ImageArrays, image_size: int, device: torch.device) -> dict[str, float]:
    return classification_metrics(infer(model, data.images, image_size, device), data.labels)


def pick_device(gpus: float) -> torch.device:
    return torch.device("cuda") if gpus > 0 and torch.cuda.is_available() else torch.device("cpu")

"""Inference and the one metrics path: batched logits or features of a model, top-1, macro-F1 and the loss from
logits, a split's metrics streamed from its shards, and the held-out part of a train split that a stage chooses its
hyperparameters on (the fine-tune learning rate, the probe's l2)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipelines import distributed, perf
from pipelines.data import split_batches
from pipelines.data.stream import ShardSubset
from pipelines.loop import hits, multi_hot, to_input


@torch.no_grad()
def infer(model: nn.Module, images: np.ndarray, image_size: int, device: torch.device, batch_size: int = 256,
          pre_logits: bool = False, precision: str = "auto") -> np.ndarray:
    """Logits, or pre-logit features (`pre_logits=True`: class token or global average pool, as trained), in
    mixed precision where the device has it (`perf.resolve_precision`); returned as float32."""
    model.eval()
    precision = perf.resolve_precision(precision, device)
    perf.enable_tf32(device)
    memory_format = perf.channels_last(model, device)
    pad = perf.is_compiled(model)  # every batch one shape: one compiled graph, not one per ragged last batch
    out = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        n = len(chunk)
        if pad and n < batch_size:
            chunk = np.concatenate([chunk, np.zeros((batch_size - n, *chunk.shape[1:]), chunk.dtype)])
        x = to_input(chunk, image_size, device, memory_format)
        with perf.autocast(precision, device):
            feats = model.forward_features(x)
            out.append(model.forward_head(feats, pre_logits=pre_logits)[:n].float().cpu())
    return torch.cat(out).numpy()


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    return 100.0 * float(hits(logits.argmax(-1), labels).mean())


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
    """The one metrics path: cross-entropy loss, top-1 and macro-F1 (percent) from logits. Multi-label labels
    ([N, K], padded with -1): the sigmoid loss, and top-1 counts a prediction among the sample's classes."""
    if labels.ndim == 2:
        x = torch.from_numpy(logits).double()
        target = multi_hot(torch.from_numpy(labels), logits.shape[-1], x.dtype)
        loss = float(F.binary_cross_entropy_with_logits(x, target, reduction="sum") / len(labels))
        return {"loss": loss, "top1": top1(logits, labels), "macro_f1": float("nan")}
    logp = torch.log_softmax(torch.from_numpy(logits).double(), -1)
    loss = float(-logp[torch.arange(len(labels)), torch.from_numpy(labels)].mean())
    return {"loss": loss, "top1": top1(logits, labels), "macro_f1": macro_f1(logits.argmax(-1), labels)}


def evaluate(model: nn.Module, data: ShardSubset, image_size: int, device: torch.device,
             max_bad_fraction: float = 0.001, workers: int = 0, precision: str = "auto") -> dict[str, float]:
    """Loss, top-1 and macro-F1 of `model` on a split streamed from its shards batch by batch, decoded in `workers`
    loader processes, inferred in `precision` (in a process group, each rank infers its part and every rank gets
    the whole split's metrics)."""
    logits, labels = [np.zeros(0, np.float32)], [np.zeros(0, np.int64)]  # a rank may own no shard of a small split
    for batch in split_batches(rank_part(data), image_size, max_bad_fraction=max_bad_fraction, workers=workers):
        logits.append(infer(model, batch.images, image_size, device, precision=precision))
        labels.append(batch.labels)
    logits, labels = (distributed.gather_rows(np.concatenate(x[1:] or x)) for x in (logits, labels))
    return classification_metrics(logits, labels)


def rank_part(split: ShardSubset) -> ShardSubset:
    """This rank's part of an evaluation split (`rank_rows`)."""
    return split.part(rank_rows(split))


def rank_rows(split: ShardSubset) -> slice:
    """This rank's contiguous part of an evaluation split (the whole split in one process): rows in even parts
    where shards are read by offset (a rank reads only its samples' bytes); whole shards, split at the shard
    boundary nearest each even cut, where they can only be streamed (a rank opens only the shards it owns)."""
    even = distributed.part(len(split))
    index, positions = split.index, split.positions
    if distributed.ranks().world_size == 1 or len(positions) == 0 or index.reads_rows:
        return even
    shard = index.shard_of(positions)
    starts = np.concatenate([[0], np.flatnonzero(np.diff(shard)) + 1, [len(positions)]])  # where each shard begins

    def cut(at: int) -> int:
        return int(starts[np.abs(starts - at).argmin()])

    return slice(cut(even.start), cut(even.stop))


def holdout(n: int, fraction: float, seed: int, salt: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held-out) indices: a seeded `fraction` of `n` examples (at least one) held out for validation."""
    perm = np.random.default_rng([seed, salt]).permutation(n)
    n_val = holdout_size(n, fraction)
    return perm[n_val:], perm[:n_val]


def holdout_size(n: int, fraction: float) -> int:
    """How many of `n` examples `holdout` holds out: `fraction` of them, at least one."""
    return max(1, int(round(fraction * n)))

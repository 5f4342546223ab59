"""Tiny training data for tests: arrays written as webdataset shards (PNG, lossless) and indexed, so a test trains
through the index, `ShardStream` and `StreamLoader` that production runs.

Shards are written once per content (a folder in the temp directory named by a hash of the arrays, filled under
a temporary name and moved into place whole, so concurrent processes share it), and indexed once per content
(`scratch_index`): module-level test data costs its PNG encoding once per machine, not once per test.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import numpy as np

from pipelines import atomic
from pipelines.data.index import ShardSubset, scratch_index
from pipelines.data.writer import write_shard

PER_SHARD = 64
ROOT = Path(tempfile.gettempdir()) / "vitscale-tiny-shards"


def as_shards(images: np.ndarray, labels: np.ndarray, per_shard: int = PER_SHARD) -> ShardSubset:
    """The whole split of uint8 `images` [N, H, W, 3] with int `labels` [N], as shards of `per_shard` samples.

    Sample i has key f"{i:06d}" and is row i of the subset (the index keeps shard order, then tar order)."""
    images = np.ascontiguousarray(images, dtype=np.uint8)
    labels = np.asarray(labels, dtype=np.int64)
    if images.ndim != 4 or images.shape[-1] != 3 or labels.shape != (len(images),):
        raise ValueError(f"need images [N, H, W, 3] and labels [N], got {images.shape} and {labels.shape}")
    digest = hashlib.sha256(repr((images.shape, labels.shape, per_shard)).encode())
    digest.update(images.tobytes())
    digest.update(labels.tobytes())
    folder = ROOT / digest.hexdigest()[:20]
    if not folder.is_dir():
        with atomic.folder(folder) as tmp:
            for s, lo in enumerate(range(0, len(images), per_shard)):
                rows = range(lo, min(lo + per_shard, len(images)))
                write_shard(tmp / f"train-{s:06d}.tar", ((f"{i:06d}", images[i], int(labels[i])) for i in rows))
    index = scratch_index(sorted(str(p) for p in folder.glob("train-*.tar")))
    return ShardSubset(index, np.arange(len(index), dtype=np.int64))

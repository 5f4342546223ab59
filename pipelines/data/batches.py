"""Evaluation reads: a split (or any subset of its rows) decoded batch by batch at one resolution, reading only the
samples asked for: by offset from local shards, by streaming (and skipping the rest) from remote ones."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from PIL import Image
from tqdm import tqdm

from pipelines.data import ImageArrays
from pipelines.data.augment import eval_image
from pipelines.data.index import ShardSubset, key_filter, scratch_index
from pipelines.data.labels import Label, label_array
from pipelines.data.reader import BadCounts, BadSample, DataError, ShardFiles, iter_encoded, read_sample


def encoded(split: ShardSubset, bad: BadCounts) -> Iterator[tuple[str, bytes, Label]]:
    """(key, image bytes, label) of the subset's samples in row order; unreadable ones counted in `bad`."""
    index, positions = split.index, split.positions
    shard_of = index.shard_of(positions)
    bounds = np.flatnonzero(np.diff(shard_of)) + 1
    files = ShardFiles()
    try:
        for rows in np.split(np.arange(len(positions)), bounds):
            if len(rows) == 0:
                continue
            shard = int(shard_of[rows[0]])
            url, mine = index.shard_url(shard), positions[rows]
            if not index.shard_seekable[shard]:
                yield from iter_encoded([url], bad=bad, want=key_filter(index, mine))
                continue
            for p in mine:
                try:
                    yield read_sample(files, url, int(index.offset[p]), int(index.size[p]))
                except BadSample as err:
                    bad[err.cause] += 1
    finally:
        files.close()


def eval_batches(split: ShardSubset | list[str], image_size: int, batch_size: int = 256, progress: bool = False,
                 desc: str = "", max_bad_fraction: float = 0.001) -> Iterator[ImageArrays]:
    """A subset (or every sample of a shard list) decoded batch by batch at `image_size`, in row order: memory
    holds one batch, whatever the split's size.

    Images go through the evaluation transform of the training image path (`augment.eval_image`: shorter side
    resized, centre crop). Unreadable samples are counted per cause and skipped (each batch's `bad`: the running
    counts), up to `max_bad_fraction` of the samples expected; past it DataError names the causes. Labels are
    int64 [b], or [b, K] for a multi-label source (K: the source's `label_width`).
    """
    if not isinstance(split, ShardSubset):
        index = scratch_index(list(split))
        split = ShardSubset(index, np.arange(len(index), dtype=np.int64))
        expected = len(index) + index.lost  # the whole split: what the tar headers list, and what cut tars lost
    else:
        expected = len(split)
    width, bad = split.index.label_width, BadCounts()
    where = f"loading {desc or (split.index.shard_url(0) if split.index.num_shards else 'an empty shard list')}"
    images, labels, names, read = [], [], [], 0
    for key, raw, label in tqdm(encoded(split, bad), total=len(split), desc=desc or "loading", unit="img",
                                disable=not progress, mininterval=5):
        try:
            images.append(eval_image(raw, image_size))
        except (OSError, ValueError, Image.DecompressionBombError):
            bad["undecodable_image"] += 1
            continue
        labels.append(label)
        names.append(key)
        if len(names) == batch_size:
            read += len(names)
            bad.check(expected, max_bad_fraction, where)
            yield ImageArrays(np.stack(images), label_array(labels, width), names, dict(+bad))
            images, labels, names = [], [], []
    read += len(names)
    bad["truncated_tar"] += max(0, expected - read - sum(bad.values()))  # expected, neither read nor counted
    bad.check(expected, max_bad_fraction, where)
    if read == 0:
        raise DataError(f"no samples found: {where}")
    if names:
        yield ImageArrays(np.stack(images), label_array(labels, width), names, dict(+bad))


def load(split: ShardSubset | list[str], image_size: int, progress: bool = False, desc: str = "",
         max_bad_fraction: float = 0.001) -> ImageArrays:
    """A subset in memory: `eval_batches` joined. For the few places that need the pixels at once (the Fig 7
    probe images); evaluation streams."""
    parts = list(eval_batches(split, image_size, 1024, progress, desc, max_bad_fraction))
    return ImageArrays(np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts]),
                       [k for p in parts for k in p.keys], parts[-1].bad)


def split_batches(split: ShardSubset, image_size: int, batch_size: int = 256,
                  max_bad_fraction: float = 0.001) -> Iterator[ImageArrays]:
    """Evaluation batches of a split left in its shards, decoded at `image_size` batch by batch (`eval_batches`)."""
    yield from eval_batches(split, image_size, batch_size, max_bad_fraction=max_bad_fraction)

"""Evaluation reads: a split (or any subset of its rows) decoded batch by batch at one resolution, reading only the
samples asked for: by offset from local shards, by byte-range requests from object storage (adjacent samples in one
request), by streaming (and skipping the rest) where a shard can only be streamed (`pipe:`, http(s))."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from pipelines.data import ImageArrays
from pipelines.data.augment import eval_image
from pipelines.data.index import ShardSubset, SourceIndex, key_filter, scratch_index
from pipelines.data.labels import Label, label_array
from pipelines.data.reader import BadCounts, DataError, ShardFiles, iter_encoded, read_samples, undecodable


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
            if index.shard_seekable[shard]:  # LOCAL or RANGED: read by offset, object storage included
                yield from read_samples(files, url, index.offset[mine], index.size[mine], bad)
            else:
                yield from _streamed(url, index, mine, bad)
    finally:
        files.close()


def _streamed(url: str, index: SourceIndex, rows: np.ndarray, bad: BadCounts) -> Iterator[tuple[str, bytes, Label]]:
    """The samples of `rows` (all in shard `url`, which can only be streamed): the shard is read until the last of
    them has been seen (read, or counted unreadable), not to its end."""
    left = len(rows)
    before = sum(bad.values())
    for sample in iter_encoded([url], bad=bad, want=key_filter(index, rows)):
        yield sample
        left -= 1 + sum(bad.values()) - before
        before = sum(bad.values())
        if left <= 0:
            return


def eval_batches(split: ShardSubset | list[str], image_size: int, batch_size: int = 256, progress: bool = False,
                 desc: str = "", max_bad_fraction: float = 0.001, workers: int = 0) -> Iterator[ImageArrays]:
    """A subset (or every sample of a shard list) decoded batch by batch at `image_size`, in row order: memory
    holds one batch (and what the loader workers have decoded ahead), whatever the split's size.

    Images go through the evaluation transform of the training image path (`augment.eval_image`: shorter side
    resized, centre crop), decoded in `workers` DataLoader processes (0: in this one; the trial passes the
    pretraining loader's). Unreadable samples are counted per cause and skipped (each batch's `bad`: the running
    counts), up to `max_bad_fraction` of the samples expected; past it DataError names the causes. Labels are
    int64 [b], or [b, K] for a multi-label source (K: the source's `label_width`).
    """
    if not isinstance(split, ShardSubset):
        index = scratch_index(list(split))
        split = ShardSubset(index, np.arange(len(index), dtype=np.int64))
        expected = len(index) + index.lost  # the whole split: what the tar headers list, and what cut tars lost
    else:
        expected = len(split)
    bad = BadCounts()
    where = f"loading {desc or (split.index.shard_url(0) if split.index.num_shards else 'an empty shard list')}"
    parts = _Decoded(split, image_size, batch_size)
    if workers:
        parts = DataLoader(parts, batch_size=None, num_workers=workers, prefetch_factor=4, persistent_workers=False)
    pending, read = [], 0
    bar = tqdm(total=len(split), desc=desc or "loading", unit="img", disable=not progress, mininterval=5)
    for part in parts:
        bar.update(part["rows"])
        bad.update(BadCounts.of(*part["bad"]))
        pending.append(part["arrays"])
        while sum(len(p) for p in pending) >= batch_size:
            batch, pending = _take(pending, batch_size)
            read += len(batch)
            bad.check(expected, max_bad_fraction, where)
            yield ImageArrays(batch.images, batch.labels, batch.keys, dict(+bad))
    bar.close()
    batch, _ = _take(pending, batch_size)
    read += len(batch)
    bad["truncated_tar"] += max(0, expected - read - sum(bad.values()))  # expected, neither read nor counted
    bad.check(expected, max_bad_fraction, where)
    if read == 0 and expected:
        raise DataError(f"no samples found: {where}")
    if len(batch):
        yield ImageArrays(batch.images, batch.labels, batch.keys, dict(+bad))


def _take(pending: list[ImageArrays], n: int) -> tuple[ImageArrays, list[ImageArrays]]:
    """The first `n` rows of the decoded parts in `pending` (fewer if they hold fewer), and the rest."""
    parts = [p for p in pending if len(p)]
    if not parts:
        return ImageArrays(np.zeros((0, 0, 0, 3), np.uint8), np.zeros(0, np.int64)), []
    joined = ImageArrays(np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts]),
                         [k for p in parts for k in p.keys])
    head = ImageArrays(joined.images[:n], joined.labels[:n], joined.keys[:n])
    rest = ImageArrays(joined.images[n:], joined.labels[n:], joined.keys[n:])
    return head, [rest] if len(rest) else []


class _Decoded(IterableDataset):
    """A subset's units, decoded: runs of `batch_size` rows of shards read by offset, and every row a shard that can
    only be streamed holds (so it is streamed once per pass). DataLoader worker w of W decodes units w, w + W, ...
    and yields one item per unit; the DataLoader hands them out round-robin, so they arrive in row order."""

    def __init__(self, split: ShardSubset, image_size: int, batch_size: int):
        self.split, self.image_size = split, image_size
        shard_of = split.index.shard_of(split.positions)
        bounds = np.concatenate([[0], np.flatnonzero(np.diff(shard_of)) + 1, [len(shard_of)]])
        self.units = []
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            step = batch_size if split.index.shard_seekable[shard_of[lo]] else hi - lo
            self.units += [(int(a), int(min(a + step, hi)), int(shard_of[lo])) for a in range(lo, hi, step)]

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        width = self.split.index.label_width
        for lo, hi, shard in self.units[worker::workers]:
            bad = BadCounts()
            images, labels, keys = [], [], []
            for key, raw, label in encoded(self.split.part(slice(lo, hi)), bad):
                try:
                    images.append(eval_image(raw, self.image_size))
                except (OSError, ValueError, Image.DecompressionBombError) as err:
                    bad.add("undecodable_image", undecodable(key, err, self.split.index.shard_url(shard)))
                    continue
                labels.append(label)
                keys.append(key)
            size = self.image_size
            arrays = ImageArrays(np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8),
                                 label_array(labels, width), keys)
            yield {"arrays": arrays, "bad": bad.parts(), "rows": hi - lo}


def load(split: ShardSubset | list[str], image_size: int, progress: bool = False, desc: str = "",
         max_bad_fraction: float = 0.001) -> ImageArrays:
    """A subset in memory: `eval_batches` joined. For the few places that need the pixels at once (the Fig 7
    probe images); evaluation streams."""
    parts = list(eval_batches(split, image_size, 1024, progress, desc, max_bad_fraction))
    return ImageArrays(np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts]),
                       [k for p in parts for k in p.keys], parts[-1].bad)


def split_batches(split: ShardSubset, image_size: int, batch_size: int = 256, max_bad_fraction: float = 0.001,
                  workers: int = 0) -> Iterator[ImageArrays]:
    """Evaluation batches of a split left in its shards, decoded at `image_size` batch by batch (`eval_batches`)."""
    yield from eval_batches(split, image_size, batch_size, max_bad_fraction=max_bad_fraction, workers=workers)

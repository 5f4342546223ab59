"""Streaming training data from shards: every sample of a subset exactly once per epoch, whatever the number of
DataLoader workers, ranks and shards.

Each epoch orders the subset by a seeded shard permutation (samples keep their tar order within a shard) and
cuts that sequence into `world_size x workers` contiguous, near-equal parts; part `rank x workers + worker`
is read by that worker (local shards by offset from the index, in a seeded permutation of the part; remote ones
streamed through a seeded shuffle buffer of encoded samples), decoded and augmented there, and sent as uint8
batches. A part may start or end inside a shard (so fewer shards than workers is fine) and
shard counts need not divide. The main process re-batches the workers' final partial batches, so an epoch has
ceil(samples / batch) steps on every worker count. Workers run ahead into the next epoch; nothing stops
between epochs.
"""

from __future__ import annotations

import itertools
from collections import defaultdict, deque
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipelines.data.augment import Augment, train_image
from pipelines.data.shards import (
    BadCounts,
    BadSample,
    DataError,
    ShardIndex,
    iter_encoded,
    read_span,
)


@dataclass(frozen=True)
class LoaderConfig:
    """How pretraining data streams from shards.

    `workers`: DataLoader worker processes per trial (0 reads in the training process).
    `shuffle_buffer`: for streamed (remote) shards, the encoded samples each worker shuffles over, on top of the
    per-epoch shard permutation. Local shards are read by offset, so each worker's part is fully permuted.
    `max_bad_fraction`: unreadable samples (truncated tar, undecodable or empty image, missing label, checksum
    mismatch) are counted per cause and skipped; above this fraction of an epoch the trial fails.
    """

    workers: int = 2
    shuffle_buffer: int = 1024
    max_bad_fraction: float = 0.001

    def __post_init__(self):
        if self.workers < 0 or self.shuffle_buffer < 1 or not 0 <= self.max_bad_fraction < 1:
            raise ValueError("need workers >= 0, shuffle_buffer >= 1 and 0 <= max_bad_fraction < 1")


def part_plan(counts: list[int], order: np.ndarray, part: int, parts: int) -> list[tuple[int, int, int]]:
    """(shard, first, stop) ranges, in epoch order, of the subset samples that part `part` of `parts` reads.

    `counts[i]` is the number of subset samples in shard i; the epoch visits shards in `order`. Parts are
    contiguous slices [part*N//parts, (part+1)*N//parts) of that sequence: disjoint, covering, sizes within 1.
    """
    total = sum(counts)
    lo, hi = part * total // parts, (part + 1) * total // parts
    plan, start = [], 0
    for shard in order:
        stop = start + counts[shard]
        if stop > lo and start < hi:
            plan.append((int(shard), max(lo - start, 0), min(hi, stop) - start))
        start = stop
        if start >= hi:
            break
    return plan


@dataclass
class ShardSubset:
    """A (nested) subset of a shard source, to be streamed rather than loaded: the source's index and the keys."""

    index: ShardIndex
    keys: list[str]

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def labels(self) -> np.ndarray:
        """The subset's labels, from the index (-1 where a sample has no `.cls`)."""
        label_of = self.index.label_of()
        return np.asarray([label_of[k] for k in self.keys], dtype=np.int64)


class ShardStream(IterableDataset):
    """An endless stream of uint8 training batches, epoch after epoch, for one rank (see the module docstring).

    Each item is a dict: `image` uint8 [b, S, S, 3], `label` int64 [b], `key` (sample keys), `epoch`, `last`
    (this worker's final batch of the epoch, possibly partial or empty) and `bad` (samples skipped since the
    worker's previous batch, per cause).
    """

    def __init__(self, index: ShardIndex, keys: list[str] | None, image_size: int, batch_size: int,
                 augment: Augment, seed: int, shuffle_buffer: int = 1024, rank: int = 0, world_size: int = 1,
                 start_epoch: int = 0):
        wanted = set(keys) if keys is not None else None
        self.shards, self.spans, self.labels = index.shards, index.spans, index.labels
        self.keys = index.keys
        self.positions = [np.asarray([i for i, k in enumerate(shard) if wanted is None or k in wanted], dtype=np.int64)
                          for shard in index.keys]  # the subset's samples in each shard, in tar order
        self.counts = [len(p) for p in self.positions]
        if sum(self.counts) == 0:
            raise ValueError("the subset has no samples in these shards")
        self.image_size, self.batch_size, self.augment, self.seed = image_size, batch_size, augment, seed
        self.shuffle_buffer, self.rank, self.world_size = shuffle_buffer, rank, world_size
        self.start_epoch = start_epoch

    def __len__(self) -> int:
        """Samples this rank reads per epoch (before any are skipped as unreadable)."""
        total = sum(self.counts)
        return (self.rank + 1) * total // self.world_size - self.rank * total // self.world_size

    def plan(self, epoch: int, worker: int, workers: int) -> list[tuple[int, int, int]]:
        order = np.random.default_rng([self.seed, epoch, 1]).permutation(len(self.shards))
        return part_plan(self.counts, order, self.rank * workers + worker, self.world_size * workers)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for epoch in itertools.count(self.start_epoch):
            yield from self.epoch(epoch, worker, workers)

    def epoch(self, epoch: int, worker: int, workers: int) -> Iterator[dict]:
        rng = np.random.default_rng([self.seed, epoch, self.rank * workers + worker, 2])
        bad = BadCounts()
        images, labels, keys = [], [], []
        held = None  # a full batch waits for the next sample: if none comes, it is the epoch's last
        for key, data, label in self._samples(epoch, worker, workers, bad, rng):
            try:
                image = train_image(data, self.image_size, self.augment, rng)
            except (OSError, ValueError, Image.DecompressionBombError):  # PIL's errors for corrupt/truncated images
                bad["undecodable_image"] += 1
                continue
            if held is not None:
                yield held
                held = None
            images.append(image)
            labels.append(label)
            keys.append(key)
            if len(labels) == self.batch_size:
                held = self._batch(images, labels, keys, epoch, False, bad)
                images, labels, keys = [], [], []
                bad.clear()  # the same counter: the sample reader keeps counting into it
        if held is not None:
            held["last"] = True
            held["bad"] = dict(BadCounts(held["bad"]) + bad)
            yield held
        else:
            yield self._batch(images, labels, keys, epoch, True, bad)

    def _samples(self, epoch: int, worker: int, workers: int, bad: BadCounts,
                 rng: np.random.Generator) -> Iterator[tuple[str, bytes, int]]:
        """This part's encoded samples, shuffled; samples that cannot be read are counted in `bad`.

        Local shards are read by offset (from the index) in a full permutation of the part; others are streamed
        shard by shard through a shuffle buffer.
        """
        plan = self.plan(epoch, worker, workers)
        if all(self.spans and self.spans[shard] is not None for shard, _, _ in plan):
            yield from self._read_at_offsets(plan, bad, rng)
        else:
            yield from self._shuffled(self._stream(plan, bad), rng)

    def _read_at_offsets(self, plan, bad: BadCounts, rng: np.random.Generator) -> Iterator[tuple[str, bytes, int]]:
        picks = [(shard, int(p)) for shard, first, stop in plan for p in self.positions[shard][first:stop]]
        files: dict[int, object] = {}
        try:
            for i in rng.permutation(len(picks)):
                shard, pos = picks[i]
                key = self.keys[shard][pos]
                try:
                    if shard not in files:
                        files[shard] = open(self.shards[shard], "rb")  # noqa: SIM115 (closed below)
                    data, label = read_span(files[shard], key, self.labels[shard][pos], self.spans[shard][pos])
                except OSError:
                    bad["truncated_tar"] += 1
                    continue
                except BadSample as err:
                    bad[err.cause] += 1
                    continue
                yield key, data, label
        finally:
            for f in files.values():
                f.close()

    def _stream(self, plan, bad: BadCounts) -> Iterator[tuple[str, bytes, int]]:
        """Streamed shards through the one shard read loop (`iter_encoded`, as evaluation reads them)."""
        for shard, first, stop in plan:
            take = {self.keys[shard][p] for p in self.positions[shard][first:stop]}
            found, here = 0, BadCounts()  # `bad` is shared with the decoding loop, which clears it per batch
            for sample in iter_encoded([self.shards[shard]], take, here):
                found += 1 + sum(here.values())  # read, and those read but unreadable (counted by cause)
                bad.update(here)
                here.clear()
                yield sample
            found += sum(here.values())
            bad.update(here)
            bad["truncated_tar"] += len(take) - found  # indexed, but the tar ended (or changed) before them

    def _shuffled(self, samples: Iterator, rng: np.random.Generator) -> Iterator:
        """webdataset-style shuffle buffer: emit a random buffered sample for each new one, then drain."""
        buffer: list = []
        for sample in samples:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(sample)
                continue
            i = int(rng.integers(len(buffer)))
            buffer[i], sample = sample, buffer[i]
            yield sample
        rng.shuffle(buffer)
        yield from buffer

    def _batch(self, images, labels, keys, epoch, last, bad) -> dict:
        shape = (0, self.image_size, self.image_size, 3)
        return {"image": np.stack(images) if images else np.zeros(shape, np.uint8),
                "label": np.asarray(labels, dtype=np.int64), "key": keys, "epoch": epoch, "last": last,
                "bad": dict(bad)}


@dataclass
class Batch:
    """One training batch from the loader: uint8 images [B, S, S, 3] (augmented), labels, keys, and whether it
    ends its epoch."""

    images: torch.Tensor
    labels: torch.Tensor
    keys: list[str]
    epoch: int
    end_of_epoch: bool


class StreamLoader:
    """ShardStream through a torch DataLoader, re-batched so each epoch has ceil(samples / batch) steps.

    Unreadable samples are counted per cause per epoch (`bad[epoch]`); past `max_bad_fraction` of the epoch's
    samples, iteration raises DataError naming the causes.
    """

    def __init__(self, stream: ShardStream, workers: int, max_bad_fraction: float = 0.001,
                 pin_memory: bool = False):
        self.stream, self.workers, self.max_bad_fraction = stream, workers, max_bad_fraction
        self.pin_memory = pin_memory
        self.bad: dict[int, BadCounts] = defaultdict(BadCounts)

    augment = None  # applied in the workers, per decoded image

    @property
    def steps_per_epoch(self) -> int:
        return -(-len(self.stream) // self.stream.batch_size)

    def skipped(self, epoch: int) -> dict[str, int]:
        return {cause: n for cause, n in self.bad.get(epoch, {}).items() if n}

    def batches(self, start_epoch: int = 0, skip: int = 0) -> Iterator[Batch]:
        """Batches from `start_epoch` on, endlessly; the first `skip` of that epoch are read and dropped (resume)."""
        self.stream.start_epoch = start_epoch
        loader = DataLoader(self.stream, batch_size=None, num_workers=self.workers, pin_memory=self.pin_memory,
                            prefetch_factor=4 if self.workers else None)
        for i, batch in enumerate(self._rebatch(iter(loader), start_epoch)):
            if batch.epoch > start_epoch or i >= skip:
                yield batch

    def _rebatch(self, items: Iterator[dict], epoch: int) -> Iterator[Batch]:
        size, parts = self.stream.batch_size, max(self.workers, 1)
        partial: dict[int, list[dict]] = defaultdict(list)
        ahead: dict[int, deque] = defaultdict(deque)  # full batches of later epochs, from workers running ahead
        finished: dict[int, int] = defaultdict(int)
        for item in items:
            e = item["epoch"]
            self.bad[e].update(item["bad"])
            self.bad[e].check(max(len(self.stream), 1), self.max_bad_fraction, f"epoch {e} of the training data")
            if item["last"]:
                finished[e] += 1
                partial[e].append(item)
            elif len(item["label"]) < size:
                partial[e].append(item)
            elif e == epoch:
                yield Batch(item["image"], item["label"], item["key"], e, False)
            else:
                ahead[e].append(item)
            while finished[epoch] == parts:
                yield from self._flush(partial.pop(epoch, []), epoch)
                finished.pop(epoch)
                epoch += 1
                for queued in ahead.pop(epoch, ()):
                    yield Batch(queued["image"], queued["label"], queued["key"], epoch, False)

    def _flush(self, items: list[dict], epoch: int) -> Iterator[Batch]:
        """The workers' final partial batches of an epoch, joined and cut into full batches plus one remainder."""
        size = self.stream.batch_size
        images = torch.cat([torch.as_tensor(i["image"]) for i in items])
        labels = torch.cat([torch.as_tensor(i["label"]) for i in items])
        keys = [k for i in items for k in i["key"]]
        if len(labels) == 0:
            raise DataError(f"epoch {epoch} of the training data: no readable samples")
        for start in range(0, len(labels), size):
            stop = min(start + size, len(labels))
            yield Batch(images[start:stop], labels[start:stop], keys[start:stop], epoch, stop == len(labels))

"""Streaming training data from shards: every sample of a subset once per epoch, in an order that does not depend
on the number of ranks or DataLoader workers, and every rank running the same number of steps.

The subset is one endless sequence: epoch after epoch, each a seeded order of all its samples. Global step t
takes positions [tB, (t+1)B) of that sequence (B the global batch), so a batch may straddle two epochs and every
batch is full (less its unreadable samples, which are counted and skipped); rank r of N takes the r-th of N equal
slices of it, and DataLoader worker w of W reads the steps t = w (mod W) (the DataLoader hands batches out
round-robin, so they arrive in step order). Each sample's augmentation is drawn from a generator seeded by (seed,
epoch, position), so N ranks see, step for step, the same augmented images as one process, and a run can resume
from step t with another N or W.

An epoch's order: a seeded shard permutation, then a seeded permutation within consecutive windows of
`ORDER_WINDOW` positions (the whole epoch for subsets up to that size), computed lazily, so a worker's memory does
not grow with the source. Local shards are read by offset from the index. All others are streamed, object storage
included: pretraining reads every sample, and a shard read start to end beats a request per sample (evaluation,
which wants a few samples of many shards, reads object storage by byte range: `reader.ShardFiles`). There each
(rank, worker) streams its contiguous part of the epoch's shard order through a seeded shuffle buffer, continuing
into the next epoch for its next batch (the order then depends on N and W; the batch sizes and step counts do not).
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipelines.data.augment import Augment, augment_decoded, decode_is_fixed, train_decode
from pipelines.data.index import LOCAL, ShardSubset, key_filter
from pipelines.data.labels import label_array
from pipelines.data.reader import BadCounts, BadSample, DataError, ShardFiles, iter_encoded, read_sample, undecodable


@dataclass(frozen=True)
class LoaderConfig:
    """How pretraining data streams from shards.

    `workers`: DataLoader worker processes per rank (0 decodes in the training process); None: `for_cpus`, one per
    CPU the rank holds but one, kept for the training loop.
    `shuffle_buffer`: for streamed (remote) shards, the encoded samples each worker shuffles over, on top of the
    per-epoch shard permutation. Local shards are read by offset, so each worker's part is fully permuted.
    `max_bad_fraction`: unreadable samples (truncated tar, undecodable or empty image, missing label, checksum
    mismatch) are counted per cause and skipped; above this fraction of an epoch the trial fails.
    `decoded_cache_mb`: where the decode is the same every epoch (crop `translate` or `none`: only the flip and
    shift are random) and the shards are local, each loader process keeps the decoded images of a subset whose
    pixels fit in this many MiB, and decodes each once instead of once per epoch (the batches are identical; a
    small subset trained for many epochs spends most of its loader time decoding). 0 turns it off.
    """

    workers: int | None = None
    shuffle_buffer: int = 1024
    max_bad_fraction: float = 0.001
    open_shards: int = 64  # shard files each loader process keeps open (least recently used closed first)
    decoded_cache_mb: int = 256

    def __post_init__(self):
        rules = [("workers", (self.workers or 0) >= 0, ">= 0"), ("shuffle_buffer", self.shuffle_buffer >= 1, ">= 1"),
                 ("max_bad_fraction", 0 <= self.max_bad_fraction < 1, "in [0, 1)"),
                 ("open_shards", self.open_shards >= 1, ">= 1"),
                 ("decoded_cache_mb", self.decoded_cache_mb >= 0, ">= 0")]
        for name, ok, valid in rules:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)}: must be {valid}")

    def for_cpus(self, cpus: float) -> LoaderConfig:
        """This config with `workers` set where it was left out: `cpus` - 1 (whole CPUs), at least 1. Decoding is
        the bound at paper scale (one worker feeds a few hundred 224-px images/s; an H100 takes thousands), and one
        worker even on one CPU overlaps decoding with the step rather than running it in between."""
        return self if self.workers is not None else replace(self, workers=max(1, int(cpus) - 1))


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


ORDER_WINDOW = 1 << 20  # positions shuffled together within an epoch (8 MB of int64 per window)


class ShardStream(IterableDataset):
    """The endless stream of one rank's uint8 training batches (see the module docstring).

    Each item is a dict: `image` uint8 [b, S, S, 3], `label` int64 [b] (a multi-label source: [b, K], each row a
    sample's classes padded with -1, K the most any sample of the source carries), `key` (sample keys), `epoch` (each
    sample's), `step` (the global step it belongs to) and `bad` ({epoch: `BadCounts.parts()`}: per cause, the
    samples skipped as unreadable and the first one's example). `batch_size` is global; a rank takes
    batch_size / world_size samples per step.
    """

    def __init__(self, subset: ShardSubset, image_size: int, batch_size: int, augment: Augment, seed: int,
                 shuffle_buffer: int = 1024, rank: int = 0, world_size: int = 1, start_step: int = 0,
                 open_shards: int = 64, decoded_cache_mb: int = 0):
        index, rows = subset.index, subset.positions  # shared (memory-mapped) where the subset is stored
        self.index, self.rows, self.label_width = index, rows, index.label_width
        # rows are sorted (a subset's positions), so each shard's are found by bisection at its end: no array the
        # size of the subset (a shard number per row: 8 bytes a sample, 2.4 GB per loader process at 300M)
        ends = np.searchsorted(rows, np.asarray(index.shard_end).astype(rows.dtype), side="left")  # rows uncast
        self.counts = np.diff(ends, prepend=0).astype(np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]])  # each shard's first entry in `rows`
        self.total = int(self.counts.sum())
        if self.total == 0:
            raise ValueError("the subset has no samples in these shards")
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} does not divide among {world_size} ranks")
        self.image_size, self.batch_size, self.augment, self.seed = image_size, batch_size, augment, seed
        self.local_batch = batch_size // world_size
        self.shuffle_buffer, self.rank, self.world_size = shuffle_buffer, rank, world_size
        self.start_step, self.open_shards = start_step, open_shards
        used = np.flatnonzero(self.counts)
        self.indexed = bool(np.all(np.asarray(index.shard_seekable)[used] == LOCAL)) if len(used) else True
        decoded_mb = self.total * image_size * image_size * 3 / 2**20
        self.cache_decoded = self.indexed and decode_is_fixed(augment) and decoded_mb <= decoded_cache_mb

    def shard_rows(self, shard: int) -> np.ndarray:
        """The subset's rows in shard `shard`, in tar order (a view of the subset's positions)."""
        return self.rows[self.starts[shard]:self.starts[shard] + self.counts[shard]]

    def __len__(self) -> int:
        """Samples per epoch (all ranks together)."""
        return self.total

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        steps = itertools.count(self.start_step + worker, workers)
        yield from (self._indexed(steps) if self.indexed else self._streamed(steps, worker, workers))

    # -- local shards: any position, read by offset ------------------------------------------------------------

    def _indexed(self, steps: Iterator[int]) -> Iterator[dict]:
        order, files, index = _EpochOrder(self.counts, self.seed), ShardFiles(self.open_shards), self.index
        cache = _DecodedCache(self.total, self.image_size) if self.cache_decoded else None
        try:
            for t in steps:
                lo = t * self.batch_size + self.rank * self.local_batch
                batch = _Batcher(self)
                for p in range(lo, lo + self.local_batch):
                    epoch, at = divmod(p, self.total)
                    shard, i = order.sample(epoch, at)
                    rng = np.random.default_rng([self.seed, epoch, at, 2])
                    where = int(self.starts[shard] + i)  # the sample's position in the subset
                    if cache is not None and cache.has(where):
                        batch.add_decoded(*cache.get(where), epoch, rng)
                        continue
                    row = int(self.rows[where])
                    try:
                        key, raw, label = read_sample(files, index.shard_url(shard), int(index.offset[row]),
                                                      int(index.size[row]))
                    except BadSample as err:
                        batch.bad[epoch].add(err.cause, f"{err} (in {index.shard_url(shard)})")
                        continue
                    batch.add(key, raw, label, epoch, rng, keep=None if cache is None else cache.keeper(where),
                              shard=shard)
                yield batch.done(t)
        finally:
            files.close()

    # -- streamed shards: each (rank, worker) reads its part of every epoch --------------------------------------

    def _streamed(self, steps: Iterator[int], worker: int, workers: int) -> Iterator[dict]:
        first = next(steps)
        # Step t is always read from part t mod `workers` (of this rank), whichever worker serves it after a resume:
        # a worker numbered by its place in this process would read another part's samples from a resume step that
        # is not a multiple of `workers`, replaying some and never reading others.
        lane = first % workers
        part, parts = self.rank * workers + lane, self.world_size * workers
        # Each step takes `local_batch` positions of the part's sequence, readable or not (an unreadable sample
        # leaves its batch a sample short, as on local shards), so the positions before `first` (one batch per
        # `workers` steps) are known without knowing which samples were unreadable: skip them, undecoded.
        skip = ((first - lane) // workers) * self.local_batch
        positions = self._part_positions(part, parts, skip)
        for t in itertools.chain([first], steps):
            batch = _Batcher(self)
            for j in range(self.local_batch):
                key, raw, label, epoch, bad = next(positions)
                if bad is not None:
                    batch.bad[epoch].update(bad)
                    continue
                rng = np.random.default_rng([self.seed, epoch, part, j, t, 3])
                batch.add(key, raw, label, epoch, rng)
            yield batch.done(t)

    def _part_positions(self, part: int, parts: int, skip: int) -> Iterator[tuple]:
        """(key, bytes, label, epoch, None) for each readable position of this part's sequence, epoch after epoch,
        and (None, None, None, epoch, BadCounts of one sample) for each unreadable one (in the shuffled order, as
        the reader met them); the first `skip` positions dropped. Every epoch holds the part's indexed samples."""
        size = (part + 1) * self.total // parts - part * self.total // parts
        if size == 0:
            raise ValueError(f"{self.total} samples cannot feed {parts} (ranks x loader workers) streams")
        first_epoch = skip // size
        skip -= first_epoch * size
        for epoch in itertools.count(first_epoch):
            order = np.random.default_rng([self.seed, epoch, 1]).permutation(self.index.num_shards)
            plan = part_plan(self.counts.tolist(), order, part, parts)
            rng = np.random.default_rng([self.seed, epoch, part, 2])
            for key, raw, label, bad in _shuffled(self._stream(plan), rng, self.shuffle_buffer):
                if skip:
                    skip -= 1
                    continue
                yield key, raw, label, epoch, bad

    def _stream(self, plan) -> Iterator[tuple]:
        """Streamed shards through the one shard read loop (`iter_encoded`, as evaluation reads them): (key, bytes,
        label, None) per readable sample and (None, None, None, BadCounts of one) per indexed sample not read."""
        for shard, first, stop in plan:
            take = self.shard_rows(shard)[first:stop]
            found, here, seen = 0, BadCounts(), set()
            for sample in iter_encoded([self.index.shard_url(shard)], here, key_filter(self.index, take)):
                if sample[0] in seen:  # a key repeated in the tar (`duplicates: first` indexed its first copy)
                    continue
                seen.add(sample[0])
                found += 1 + sum(here.values())  # read, and those read but unreadable (counted by cause)
                yield from _unreadable(here)
                yield (*sample, None)
            found += sum(here.values())
            if len(take) > found:  # indexed, but the tar ended (or changed) before them (the reader's example first)
                here["truncated_tar"] += len(take) - found
                here.first.setdefault("truncated_tar", f"{self.index.shard_url(shard)} ended before "
                                                       f"{len(take) - found} of its indexed samples")
            yield from _unreadable(here)


def _unreadable(counts: BadCounts) -> Iterator[tuple]:
    """One (None, None, None, BadCounts of one sample) per sample `counts` holds, each with its cause's example;
    empties `counts`."""
    for cause, n in list(counts.items()):
        one = BadCounts.of({cause: 1}, {cause: counts.first[cause]} if cause in counts.first else {})
        yield from itertools.repeat((None, None, None, one), n)
    counts.clear()


_ImageErrors = (OSError, ValueError, Image.DecompressionBombError)  # what PIL raises for corrupt or cut images


class _Batcher:
    """One step's samples for one rank, decoded and augmented as they come; unreadable ones counted per epoch."""

    def __init__(self, stream: ShardStream):
        self.stream = stream
        self.images, self.labels, self.keys, self.epochs = [], [], [], []
        self.bad: defaultdict[int, BadCounts] = defaultdict(BadCounts)

    def add(self, key: str, raw: bytes, label, epoch: int, rng: np.random.Generator, keep=None,
            shard: int | None = None) -> None:
        """Decode and augment a sample (`train_image`); `keep(key, pixels, label)` receives the decoded image. An
        undecodable one is counted (with its `shard`'s URL, where the shard is known, for the error to name: looked
        up only then), never kept (so counted again in every epoch)."""
        try:
            pixels = train_decode(raw, self.stream.image_size, self.stream.augment, rng)
        except _ImageErrors as err:
            url = None if shard is None else self.stream.index.shard_url(shard)
            self.bad[epoch].add("undecodable_image", undecodable(key, err, url))
            return
        if keep is not None:
            keep(key, pixels, label)
        self.add_decoded(key, pixels, label, epoch, rng)

    def add_decoded(self, key: str, pixels: np.ndarray, label, epoch: int, rng: np.random.Generator) -> None:
        """A decoded sample (by `add`, or earlier: `_DecodedCache`): only its augmentation is left to draw."""
        self.images.append(augment_decoded(pixels, self.stream.augment, rng))
        self.labels.append(label)
        self.keys.append(key)
        self.epochs.append(epoch)

    def done(self, step: int) -> dict:
        size = self.stream.image_size
        return {"image": np.stack(self.images) if self.images else np.zeros((0, size, size, 3), np.uint8),
                "label": label_array(self.labels, self.stream.label_width), "key": self.keys,
                "epoch": np.asarray(self.epochs, np.int64), "step": step,
                "bad": {e: counts.parts() for e, counts in self.bad.items() if counts}}


class _DecodedCache:
    """The decoded (not yet augmented) images of one loader process's subset samples, by position in the subset:
    one uint8 array allocated when the first is kept (`LoaderConfig.decoded_cache_mb` bounds its size)."""

    def __init__(self, total: int, size: int):
        self.total, self.size, self.pixels = total, size, None
        self.keys: list[str | None] = [None] * total  # None: not kept (yet)
        self.labels: list = [None] * total

    def has(self, where: int) -> bool:
        return self.keys[where] is not None

    def get(self, where: int) -> tuple[str, np.ndarray, object]:
        return self.keys[where], self.pixels[where], self.labels[where]

    def keeper(self, where: int):
        """`_Batcher.add`'s `keep` for the sample at `where`."""
        def keep(key: str, pixels: np.ndarray, label) -> None:
            if self.pixels is None:
                self.pixels = np.empty((self.total, self.size, self.size, 3), np.uint8)
            self.pixels[where], self.keys[where], self.labels[where] = pixels, key, label
        return keep


class _EpochOrder:
    """Position -> (shard, index among the subset's samples in that shard) in an epoch's order: a seeded shard
    permutation, then a seeded permutation within each window of ORDER_WINDOW positions. Keeps one epoch's shard
    layout and one window's permutation."""

    def __init__(self, counts: np.ndarray, seed: int):
        self.counts, self.seed, self.total = counts, seed, int(counts.sum())
        self.epoch, self.window = None, None

    def sample(self, epoch: int, at: int) -> tuple[int, int]:
        if epoch != self.epoch:
            self.epoch, self.window = epoch, None
            self.shard_order = np.random.default_rng([self.seed, epoch, 1]).permutation(len(self.counts))
            self.ends = np.cumsum(self.counts[self.shard_order])
        w = at // ORDER_WINDOW
        if w != self.window:
            lo = w * ORDER_WINDOW
            size = min(ORDER_WINDOW, self.total - lo)
            self.perm, self.window = lo + np.random.default_rng([self.seed, epoch, w, 4]).permutation(size), w
        q = int(self.perm[at - w * ORDER_WINDOW])  # position in the shard-ordered sequence
        j = int(np.searchsorted(self.ends, q, side="right"))
        return int(self.shard_order[j]), q - int(self.ends[j] - self.counts[self.shard_order[j]])


def _shuffled(samples: Iterator, rng: np.random.Generator, buffer_size: int) -> Iterator:
    """webdataset-style shuffle buffer: emit a random buffered sample for each new one, then drain."""
    buffer: list = []
    for sample in samples:
        if len(buffer) < buffer_size:
            buffer.append(sample)
            continue
        i = int(rng.integers(len(buffer)))
        buffer[i], sample = sample, buffer[i]
        yield sample
    rng.shuffle(buffer)
    yield from buffer


@dataclass
class Batch:
    """One training batch from the loader: uint8 images [B, S, S, 3] (augmented), labels, keys, the epoch of its
    first sample, whether it ends an epoch, and (streamed) each sample's epoch."""

    images: torch.Tensor
    labels: torch.Tensor
    keys: list[str]
    epoch: int
    end_of_epoch: bool
    sample_epochs: np.ndarray | None = None


class StreamLoader:
    """ShardStream through a torch DataLoader, as `Batch`es in global-step order.

    Unreadable samples are counted per cause per epoch (`bad[epoch]`, the epoch of the step's first sample); past
    `max_bad_fraction` of an epoch's samples, iteration raises DataError naming the causes.
    """

    def __init__(self, stream: ShardStream, workers: int, max_bad_fraction: float = 0.001,
                 pin_memory: bool = False):
        self.stream, self.workers, self.max_bad_fraction = stream, workers, max_bad_fraction
        self.pin_memory = pin_memory
        self.bad: dict[int, BadCounts] = defaultdict(BadCounts)

    def skipped(self, epoch: int) -> dict[str, int]:
        return {cause: n for cause, n in self.bad.get(epoch, {}).items() if n}

    def batches(self, start_step: int = 0) -> Iterator[Batch]:
        """Batches from global step `start_step` on, endlessly (a resumed run starts where it stopped)."""
        self.stream.start_step = start_step
        # Its own generator: a DataLoader draws its base seed from the one it is given, and drawing from torch's
        # global generator would shift what a resumed run draws (dropout, drop-path) against an uninterrupted one.
        loader = DataLoader(self.stream, batch_size=None, num_workers=self.workers, pin_memory=self.pin_memory,
                            prefetch_factor=4 if self.workers else None, persistent_workers=False,
                            generator=torch.Generator().manual_seed(start_step))
        size, total = self.stream.batch_size, len(self.stream)
        for expected, item in zip(itertools.count(start_step), loader, strict=False):
            t = item["step"]
            assert t == expected, f"loader returned step {t} for {expected}"  # the round-robin contract
            for epoch, parts in item["bad"].items():
                self.bad[epoch].update(BadCounts.of(*parts))
                self.bad[epoch].check(total, self.max_bad_fraction, f"epoch {epoch} of the training data")
            if len(item["label"]) == 0:
                raise DataError(f"step {t} of the training data: no readable samples")
            yield Batch(torch.as_tensor(item["image"]), torch.as_tensor(item["label"]), item["key"], t * size // total,
                        (t + 1) * size // total > t * size // total, item["epoch"])

"""Building a source's index (`pipelines.data.index`): each shard scanned once (its tar headers, or its sidecar),
in parallel (a process pool, or any `map` the caller passes, such as Ray tasks across a cluster), the columns merged
in one step, repeated keys refused or dropped, and the folder moved into place whole (`pipelines.atomic`)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipelines import atomic
from pipelines.data.index import (
    INDEX_VERSION,
    LOCAL,
    RANGED,
    SAMPLE_COLUMNS,
    SHARD_COLUMNS,
    STREAMED,
    Mapper,
    SourceIndex,
    key_hash,
)
from pipelines.data.labels import Label, parse_labels
from pipelines.data.reader import (
    BLOCK,
    OBJECT_STORES,
    DataError,
    ShardFiles,
    TarFormatError,
    iter_members,
    open_url,
    padded,
    parse_header,
    split_member_name,
)
from pipelines.data.sources import info_lengths, is_local, read_sidecar


@dataclass
class ShardRows:
    """One shard's rows, as `scan_shard` found them (keys kept for the sidecar and for duplicate messages)."""

    url: str
    keys: list[str] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    labels: list[Label] = field(default_factory=list)
    lost: int = 0
    seekable: int = STREAMED  # how it is read: `index.STREAMED`, `LOCAL` or `RANGED`

    def add(self, key: str, offset: int, size: int, cls: bytes | None, meta: bytes | None) -> None:
        label = parse_labels(cls, meta)
        self.keys.append(key)
        self.offsets.append(offset)
        self.sizes.append(size)
        self.labels.append(-1 if label is None else label)  # unreadable: the readers skip it as missing_label


@dataclass
class ShardColumns:
    """One shard's rows as the index stores them: what a scan task sends back (no Python object per sample, so the
    merge on the driver is a copy, and the work per sample stays in the parallel tasks)."""

    url: str
    offset: np.ndarray
    size: np.ndarray
    label: np.ndarray  # each sample's first class, -1 for none
    key: np.ndarray
    counts: np.ndarray  # classes per sample
    classes: np.ndarray  # every sample's classes, flat
    lost: int
    seekable: int

    @classmethod
    def of(cls, rows: ShardRows) -> ShardColumns:
        multi = [label if isinstance(label, list) else [] if label < 0 else [label] for label in rows.labels]
        return cls(rows.url, np.asarray(rows.offsets, "<u8"), np.asarray(rows.sizes, "<u4"),
                   np.asarray([c[0] if c else -1 for c in multi], "<i4"), key_hash(rows.keys),
                   np.asarray([len(c) for c in multi], np.int64), np.asarray([c for cs in multi for c in cs], "<i4"),
                   rows.lost, rows.seekable)


def scan_shard(url: str, expected: int | None = None, sidecars: bool = True) -> ShardRows:
    """Index one shard: a local plain tar from its headers alone (no image byte is read); a remote shard from its
    sidecar (`sources.sidecar_url`) where it has one, else by streaming it (the only way for shards nobody
    indexed); compressed local tars by streaming too. A plain tar in object storage is marked RANGED (its offsets,
    from the sidecar or the stream, address the object's bytes).

    `lost` counts samples the tar cannot give: the shortfall against `expected` (from `_info.json`) where known,
    else the one sample whose members were cut."""
    if not is_local(url):
        side = read_sidecar(url) if sidecars else None
        if side is None:
            rows = _streamed_rows(url, expected)
        else:
            rows = ShardRows(url, list(side["keys"]), list(side["offsets"]), list(side["sizes"]), list(side["labels"]))
        if url.startswith(OBJECT_STORES) and (side is not None or _plain_tar(url)):
            rows.seekable = RANGED  # a sidecar is written from a plain tar's headers (`_scan_job`, `writer`)
        return rows
    with open(url, "rb") as f:
        if f.read(2) == b"\x1f\x8b":  # gzip: nothing to seek in
            return _streamed_rows(url, expected)
    return _local_rows(url, expected)


def _plain_tar(url: str) -> bool:
    """Whether an object's first block is a tar header (an uncompressed tar, whose offsets address its bytes):
    one ranged read."""
    files = ShardFiles(1)
    try:
        parse_header(files.read(url, 0, BLOCK))
        return True
    except (TarFormatError, DataError):
        return False
    finally:
        files.close()


def _samples(members: Iterable[tuple[str, int, int, Callable[[], bytes]]]) -> Iterator[tuple]:
    """(key, start, size, .cls, .json with labels) of each sample: consecutive members with one key, from (member
    name, where its first header starts, where its padded data ends, a reader of its data). The last sample comes
    only if `members` ends without an error: a cut tar may have cut it."""
    current, start, stop, cls, meta = None, 0, 0, None, None
    for name, first, end, read in members:
        key, ext = split_member_name(name)
        if key != current:
            if current is not None:
                yield current, start, stop - start, cls, meta
            current, start, cls, meta = key, first, None, None
        stop = end
        if ext == "cls":
            cls = read()
        elif ext == "json":
            body = read()
            meta = body if b'"labels"' in body else None
    if current is not None:
        yield current, start, stop - start, cls, meta


def _local_rows(url: str, expected: int | None) -> ShardRows:
    rows, ended = ShardRows(url, seekable=LOCAL), []
    fd = os.open(url, os.O_RDONLY)
    try:
        members = ((m.name, m.start, m.data + padded(m.size), lambda m=m: os.pread(fd, m.size, m.data))
                   for m in iter_members(lambda at, n: os.pread(fd, n, at), os.fstat(fd).st_size, ended))
        try:
            for sample in _samples(members):
                rows.add(*sample)
        except TarFormatError:
            pass
    finally:
        os.close(fd)
    truncated = not ended  # every tar writer ends with two zero blocks: without them it was cut
    rows.lost = max(expected - len(rows.keys), 0) if expected is not None else int(truncated)
    return rows


def _streamed_rows(url: str, expected: int | None) -> ShardRows:
    """Index a shard that can only be streamed (`reader.open_url`: `pipe:`, URLs, gzip): every byte is read."""
    import tarfile

    rows, truncated = ShardRows(url), False
    try:
        with open_url(url) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            members = ((m.name, m.offset, m.offset_data + padded(m.size),
                        lambda m=m: tar.extractfile(m).read()) for m in tar if m.isfile())
            for sample in _samples(members):
                rows.add(*sample)
    except (tarfile.TarError, OSError, EOFError):
        truncated = True
    rows.lost = max(expected - len(rows.keys), 0) if expected is not None else int(truncated)
    return rows


def _scan_job(job: tuple[list[str], list[int | None], bool, bool]) -> list[ShardColumns]:
    """One task of a parallel build: a run of shards (top level, so a process pool or Ray can ship it), each local
    one's sidecar written from its rows where asked."""
    from pipelines.data.writer import store_sidecar

    urls, expected, sidecars, publish = job
    found = [scan_shard(url, n, sidecars) for url, n in zip(urls, expected, strict=True)]
    for rows in found:
        if publish and rows.seekable == LOCAL:
            store_sidecar(Path(rows.url), rows)
    return [ShardColumns.of(rows) for rows in found]


def _pool_map(workers: int) -> Mapper:
    def run(fn: Callable, jobs: list) -> Iterator:
        if workers <= 1 or len(jobs) <= 1:
            yield from map(fn, jobs)
            return
        with ProcessPoolExecutor(max_workers=workers) as pool:
            yield from pool.map(fn, jobs)
    return run


def build(shards: list[str], folder: Path, *, mapper: Mapper | None = None, workers: int | None = None,
          duplicates: str = "refuse", sidecars: bool = True, write_sidecars: bool = False,
          progress: bool = False) -> SourceIndex:
    """Index `shards` into `folder` (which must not exist; it appears whole when done).

    Args:
        mapper: runs the per-shard scans (`map(fn, jobs)`, results in order); default a process pool of `workers`
            (default: one per core).
        duplicates: a key found in two places is `refuse`d (DataError naming both shards) or, with `first`, its
            later copies are dropped, counted in the index's `duplicates_dropped`.
        sidecars: read a remote shard's sidecar where it has one (else it is streamed).
        write_sidecars: write a sidecar beside each local plain tar (`python -m pipelines.data.index`).
    """
    if duplicates not in ("refuse", "first"):
        raise ValueError(f"duplicates must be 'refuse' or 'first', not {duplicates!r}")
    workers = workers or os.cpu_count() or 1
    per_job = max(1, min(64, len(shards) // (workers * 8) or 1))
    lengths = info_lengths(shards)
    jobs = [(shards[i:i + per_job], [lengths.get(u) for u in shards[i:i + per_job]], sidecars,
             write_sidecars) for i in range(0, len(shards), per_job)]
    started = time.perf_counter()
    with atomic.folder(Path(folder)) as tmp:
        writer = _Columns(tmp)
        bar = tqdm(total=len(shards), desc="indexing shards", unit="shard", disable=not progress, mininterval=2,
                   delay=2)  # shown for builds that take a while
        for part in (mapper or _pool_map(workers))(_scan_job, jobs):
            for rows in part:
                writer.add(rows)
            bar.update(len(part))
            bar.set_postfix_str(f"{writer.n / (time.perf_counter() - started):,.0f} samples/s", refresh=False)
        bar.close()
        dropped = writer.finish(duplicates)
        (tmp / "meta.json").write_text(json.dumps({
            "version": INDEX_VERSION, "num_samples": writer.n - dropped, "num_shards": len(shards),
            "label_width": writer.width, "duplicates_dropped": dropped, "workers": workers,
            "built_by": getattr(mapper, "__name__", "process pool") if mapper else "process pool",
            "build_seconds": round(time.perf_counter() - started, 3)}))
    return SourceIndex(folder)


class _Columns:
    """The index's column files, appended to shard by shard as the scans arrive."""

    def __init__(self, folder: Path):
        self.folder, self.n, self.width, self.vals = folder, 0, 1, 0
        names = [*SAMPLE_COLUMNS, *SHARD_COLUMNS, "label_ptr", "label_val"]
        self.files = {name: open(folder / f"{name}.bin", "wb") for name in names}  # noqa: SIM115 (closed in finish)
        self.urls = open(folder / "shards.txt", "w", encoding="utf-8")  # noqa: SIM115
        self.files["label_ptr"].write(np.zeros(1, "<u8").tobytes())

    def add(self, rows: ShardColumns) -> None:
        if "\n" in rows.url:
            raise DataError(f"a shard URL holds a line break: {rows.url!r}")
        self.width = max(self.width, int(rows.counts.max(initial=1)))
        f = self.files
        for name in SAMPLE_COLUMNS:
            f[name].write(getattr(rows, name).tobytes())
        f["label_val"].write(rows.classes.tobytes())
        f["label_ptr"].write((self.vals + np.cumsum(rows.counts)).astype("<u8").tobytes())
        self.vals += int(rows.counts.sum())
        self.n += len(rows.key)
        f["shard_end"].write(np.asarray([self.n], "<u8").tobytes())
        f["shard_lost"].write(np.asarray([rows.lost], "<u4").tobytes())
        f["shard_seekable"].write(np.asarray([rows.seekable], "u1").tobytes())
        self.urls.write(rows.url + "\n")

    def finish(self, duplicates: str) -> int:
        for f in (*self.files.values(), self.urls):
            f.close()
        if self.width == 1:  # single-label: `label` says it all
            for name in ("label_ptr", "label_val"):
                (self.folder / f"{name}.bin").unlink()
        return _check_duplicates(self.folder, self.n, duplicates)


def _check_duplicates(folder: Path, n: int, policy: str) -> int:
    """Refuse (or drop all but the first copy of) keys found twice; returns the copies dropped."""
    if n == 0:
        return 0
    keys = np.fromfile(folder / "key.bin", dtype="<u8")
    order = np.argsort(keys, kind="stable")
    repeat = np.flatnonzero(keys[order][1:] == keys[order][:-1]) + 1  # sorted positions equal to their left
    if len(repeat) == 0:
        return 0
    ends = np.fromfile(folder / "shard_end.bin", dtype="<u8")
    if policy == "refuse":
        first, again = int(order[repeat[0] - 1]), int(order[repeat[0]])
        urls = (folder / "shards.txt").read_text(encoding="utf-8").splitlines()
        a, b = (urls[int(np.searchsorted(ends, p, side="right"))] for p in (first, again))
        raise DataError(f"sample key repeated: {len(repeat):,} keys appear twice or more, the first in {a} and "
                        f"{b} (rows {first} and {again}); re-write the shards with unique keys, or keep the first "
                        f"copy of each (data.duplicates: first / --duplicates first)")
    keep = np.ones(n, dtype=bool)
    keep[order[repeat]] = False
    for name, dtype in SAMPLE_COLUMNS.items():
        np.fromfile(folder / f"{name}.bin", dtype=dtype)[keep].tofile(folder / f"{name}.bin")
    if (folder / "label_ptr.bin").exists():
        ptr = np.fromfile(folder / "label_ptr.bin", dtype="<u8")
        vals = np.fromfile(folder / "label_val.bin", dtype="<i4")
        lengths = np.diff(ptr)[keep]
        take = np.repeat(keep, np.diff(ptr).astype(np.int64))
        vals[take].tofile(folder / "label_val.bin")
        np.concatenate([[0], np.cumsum(lengths)]).astype("<u8").tofile(folder / "label_ptr.bin")
    kept_before = np.concatenate([[0], np.cumsum(keep)])
    kept_before[ends.astype(np.int64)].astype("<u8").tofile(folder / "shard_end.bin")
    return int((~keep).sum())

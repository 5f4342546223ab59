"""A source's index: fixed-width columns, one row per sample, memory-mapped read-only by every process.

Per sample (row p, samples in shard order, each shard's in tar order): `offset` (u8, where its first tar header
starts), `size` (u4, the bytes of all its members, headers included: one read gets the sample), `label` (i4, its
class; -1 where it has none; a multi-label sample's smallest class) and `key` (u8, a hash of its key). A
multi-label source adds `label_ptr` (u8, n+1) and `label_val` (i4): its classes as CSR. Per shard: `shard_end`
(u8, cumulative sample counts), `shard_lost` (u4, samples a truncated or corrupt tar lost), `shard_seekable`
(u1: a local plain tar, read by offset; else streamed) and the URLs in `shards.txt`. That is 24 bytes a sample
for a single-label source, shared page cache across the processes of a node: no Python object per sample
(FFCV's metadata table and Hugging Face's Arrow files work the same way).

The folder is built once (`build`), shards indexed in parallel (a process pool, or any `map` the caller passes,
such as Ray tasks across a cluster), merged in one step, and moved into place whole (`pipelines.atomic`).
`python -m pipelines.data.index URLS --out DIR` indexes shards this project did not write.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipelines import atomic
from pipelines.data.labels import Label, parse_labels
from pipelines.data.reader import DataError, TarFormatError, iter_members, open_url, padded, split_member_name
from pipelines.data.sources import check_local_shards, info_lengths, is_local, read_sidecar

INDEX_VERSION = 3  # 3: columns of arrays, a sample's whole byte span; 2: multi-label JSON; bump when rows change
SAMPLE_COLUMNS = {"offset": "<u8", "size": "<u4", "label": "<i4", "key": "<u8"}
SHARD_COLUMNS = {"shard_end": "<u8", "shard_lost": "<u4", "shard_seekable": "u1"}
Mapper = Callable[[Callable, list], Iterable]  # map(fn, jobs) -> results in job order


def key_hash(keys: list[str]) -> np.ndarray:
    """u8 hashes of sample keys (64-bit BLAKE2b): what the index keeps of a key."""
    return np.frombuffer(b"".join(hashlib.blake2b(k.encode(), digest_size=8).digest() for k in keys) or b"",
                         dtype="<u8").copy()


@dataclass
class ShardRows:
    """One shard's rows, as `scan_shard` found them (keys kept for the sidecar and for duplicate messages)."""

    url: str
    keys: list[str] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    labels: list[Label] = field(default_factory=list)
    lost: int = 0
    seekable: bool = False

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
    seekable: bool

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
    indexed); compressed local tars by streaming too.

    `lost` counts samples the tar cannot give: the shortfall against `expected` (from `_info.json`) where known,
    else the one sample whose members were cut."""
    if not is_local(url):
        side = read_sidecar(url) if sidecars else None
        if side is not None:
            return ShardRows(url, list(side["keys"]), list(side["offsets"]), list(side["sizes"]), list(side["labels"]))
        return _streamed_rows(url, expected)
    with open(url, "rb") as f:
        if f.read(2) == b"\x1f\x8b":  # gzip: nothing to seek in
            return _streamed_rows(url, expected)
    return _local_rows(url, expected)


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
    rows, ended = ShardRows(url, seekable=True), []
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
        if publish and rows.seekable:
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
    jobs = [(shards[i:i + per_job], [lengths.get(os.path.basename(u)) for u in shards[i:i + per_job]], sidecars,
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


class SourceIndex:
    """An index folder opened read-only: its columns memory-mapped (see the module docstring), its shard URLs
    read on demand. Pickles as its folder, so a loader worker or a Ray task maps the same files.

    `rebase` (old prefix, new prefix) maps shard paths made in the driver's cache to this node's cache, for shards
    every node generates (or converts) itself at the same content."""

    def __init__(self, folder: Path | str, rebase: tuple[str, str] | None = None):
        self.folder, self.rebase = Path(folder), rebase
        meta_path = self.folder / "meta.json"
        if not meta_path.exists():
            raise DataError(f"no index at {self.folder} (meta.json missing)")
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("version") != INDEX_VERSION:
            raise DataError(f"index {self.folder} has version {self.meta.get('version')}, this reader "
                            f"{INDEX_VERSION}: build it again")
        self.n, self.num_shards = int(self.meta["num_samples"]), int(self.meta["num_shards"])
        self.label_width = int(self.meta["label_width"])
        for name, dtype in {**SAMPLE_COLUMNS, **SHARD_COLUMNS}.items():
            setattr(self, name, self._map(name, dtype))
        multi = self.label_width > 1
        self.label_ptr = self._map("label_ptr", "<u8") if multi else None
        self.label_val = self._map("label_val", "<i4") if multi else None
        self._urls: np.ndarray | None = None

    def _map(self, name: str, dtype: str) -> np.ndarray:
        path = self.folder / f"{name}.bin"
        if path.stat().st_size == 0:
            return np.zeros(0, dtype=dtype)
        return np.memmap(path, dtype=dtype, mode="r")

    def __reduce__(self):
        return SourceIndex, (str(self.folder), self.rebase)

    def __len__(self) -> int:
        return self.n

    # -- shards ------------------------------------------------------------------------------------------------

    def shard_url(self, shard: int) -> str:
        """The URL of shard `shard` (read from `shards.txt` through a map of its line starts)."""
        if self._urls is None:
            raw = np.memmap(self.folder / "shards.txt", dtype="u1", mode="r")
            self._raw_urls = raw
            self._urls = np.concatenate([[0], np.flatnonzero(raw == 10) + 1])
        a, b = int(self._urls[shard]), int(self._urls[shard + 1]) - 1
        return rebased(bytes(self._raw_urls[a:b]).decode("utf-8"), self.rebase)

    @property
    def shards(self) -> list[str]:
        """Every shard URL: O(shards) strings, for messages and small sources; hot paths use `shard_url`."""
        return [rebased(u, self.rebase) for u in (self.folder / "shards.txt").read_text(encoding="utf-8").splitlines()]

    def shard_start(self, shard: int) -> int:
        return int(self.shard_end[shard - 1]) if shard else 0

    def shard_of(self, positions: np.ndarray) -> np.ndarray:
        """The shard each row in `positions` lies in."""
        return np.searchsorted(self.shard_end, positions, side="right")

    @property
    def lost(self) -> int:
        """Samples that truncated or corrupt tars lost (what `_info.json` promised, or one per cut tar)."""
        return int(np.asarray(self.shard_lost, dtype=np.int64).sum())

    # -- rows --------------------------------------------------------------------------------------------------

    def labels_of(self, positions: np.ndarray) -> np.ndarray:
        """Labels of the rows in `positions`: int64 [n], or [n, label_width] (-1 padded) for a multi-label source."""
        positions = np.asarray(positions, dtype=np.int64)
        if self.label_ptr is None:
            return np.asarray(self.label[positions], dtype=np.int64)
        starts = np.asarray(self.label_ptr[positions], dtype=np.int64)
        stops = np.asarray(self.label_ptr[positions + 1], dtype=np.int64)
        out = np.full((len(positions), self.label_width), -1, dtype=np.int64)
        for row, (a, b) in enumerate(zip(starts, stops, strict=True)):
            out[row, :b - a] = self.label_val[a:b]
        return out

    def keys_of(self, positions: Iterable[int]) -> list[str]:
        """Sample keys, read back from the tar headers of seekable shards (for messages and tests, not hot paths)."""
        from pipelines.data.reader import ShardFiles, sample_parts

        files, out = ShardFiles(), []
        for p in positions:
            shard = int(self.shard_of(np.asarray([p]))[0])
            out.append(sample_parts(files.read(self.shard_url(shard), int(self.offset[p]), int(self.size[p])))[0])
        files.close()
        return out

    # -- subsets -----------------------------------------------------------------------------------------------

    def order(self, seed: int) -> np.ndarray:
        """Rows by a seeded hash of their key (64-bit mix of key hash and seed): a pure function of the source's key
        set and `seed`, whatever the shard order. Computed once per (source, seed), O(N), and kept beside the
        index (`order-<seed>.bin`); a read-only index computes it in memory."""
        return self._stored(f"order-{seed}", lambda: np.argsort(_mix(np.asarray(self.key), seed), kind="stable"))

    def first_rows(self, seed: int, n: int) -> np.ndarray:
        """The `n` rows first in `order(seed)`, sorted: stored beside the index (`subset-<seed>-<n>.bin`) once, then
        memory-mapped, so every rank and loader worker of every trial of the point shares one copy."""
        return self._stored(f"subset-{seed}-{n}", lambda: np.sort(np.asarray(self.order(seed)[:n])))

    def _stored(self, name: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
        """Row positions kept as `<name>.bin` beside the index: mapped where stored, else computed and stored (held
        in memory where the index folder is read-only)."""
        dtype = "<u4" if self.n < 2**32 else "<u8"
        if not (self.folder / f"{name}.bin").exists():
            rows = compute().astype(dtype)
            try:
                atomic.write_bytes(self.folder / f"{name}.bin", rows.tobytes())
            except OSError:
                return rows
        return self._map(name, dtype)


def rebased(url: str, rebase: tuple[str, str] | None) -> str:
    """`url` with the prefix `rebase[0]` replaced by `rebase[1]` (shards made in the driver's cache, found in this
    node's); unchanged without a rebase or that prefix."""
    if rebase is None or not url.startswith(rebase[0]):
        return url
    return rebase[1] + url[len(rebase[0]):]


def key_filter(index: SourceIndex, rows: np.ndarray) -> Callable[[str], bool]:
    """Whether a streamed sample's key is one of `rows`' (by key hash): how a shard that can only be streamed is
    read for a subset of its samples."""
    wanted = set(np.asarray(index.key[rows]).tolist())
    return lambda key: int(key_hash([key])[0]) in wanted


def _mix(keys: np.ndarray, seed: int) -> np.ndarray:
    """splitmix64 of key hash + seed: a seeded, well-spread score per row."""
    z = keys.astype(np.uint64) + np.uint64((seed * 0x9E3779B97F4A7C15 + 20210603) % 2**64)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@dataclass
class ShardSubset:
    """Rows of a source to read: the index and the positions (sorted rows; integers, memory-mapped where the subset
    is stored) of the subset's samples."""

    index: SourceIndex
    positions: np.ndarray

    def __len__(self) -> int:
        return len(self.positions)

    @property
    def labels(self) -> np.ndarray:
        """The subset's labels (-1 where a sample has none): int64 [n], or [n, K] (-1 padded) for a multi-label
        source."""
        return self.index.labels_of(self.positions)

    def part(self, rows: slice) -> ShardSubset:
        return ShardSubset(self.index, self.positions[rows])


def scratch_index(shards: list[str]) -> SourceIndex:
    """An index of `shards` in this machine's temp folder, built once per content (for plain Python callers and
    tests that hold a shard list rather than a prepared source)."""
    import tempfile

    from pipelines.data import cached_index

    return SourceIndex(cached_index(shards, Path(tempfile.gettempdir()) / "vitscale-index", workers=1))


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m pipelines.data.index",
        description="Index webdataset shards (local paths, http(s) URLs, pipe: commands) once, in parallel, so "
                    "every study reads the small index instead of the shards. Also writes each local shard's "
                    "sidecar (<shard>.idx.json) so a remote copy is indexed without reading it.")
    parser.add_argument("urls", help="shard spec, brace-expanded: /data/in21k/train-{000000..001023}.tar")
    parser.add_argument("--out", required=True, help="folder to write the index into (must not exist)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: one per core)")
    parser.add_argument("--duplicates", choices=("refuse", "first"), default="refuse",
                        help="a key present twice: refuse (default) or keep the first copy")
    parser.add_argument("--no-sidecars", action="store_true", help="do not write sidecars beside local shards")
    args = parser.parse_args(argv)
    try:
        shards = check_local_shards(args.urls)
        if Path(args.out).exists():
            raise DataError(f"--out {args.out} exists; an index is written into a new folder")
        index = build(shards, Path(args.out), workers=args.workers, duplicates=args.duplicates,
                      write_sidecars=not args.no_sidecars, progress=True)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    meta = index.meta
    print(f"{meta['num_samples']:,} samples in {meta['num_shards']:,} shards indexed in {meta['build_seconds']:.1f} s "
          f"({meta['num_samples'] / max(meta['build_seconds'], 1e-9):,.0f} samples/s): {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""A source's index: fixed-width columns, one row per sample, memory-mapped read-only by every process.

Per sample (row p, samples in shard order, each shard's in tar order): `offset` (u8, where its first tar header
starts), `size` (u4, the bytes of all its members, headers included: one read gets the sample), `label` (i4, its
class; -1 where it has none; a multi-label sample's smallest class) and `key` (u8, a hash of its key). A
multi-label source adds `label_ptr` (u8, n+1) and `label_val` (i4): its classes as CSR. Per shard: `shard_end`
(u8, cumulative sample counts), `shard_lost` (u4, samples a truncated or corrupt tar lost), `shard_seekable`
(u1, how its samples are read: `LOCAL`, `RANGED` or `STREAMED`, below) and the URLs in `shards.txt`. That is 24
bytes a sample for a single-label source, shared page cache across the processes of a node: no Python object per
sample (FFCV's metadata table and Hugging Face's Arrow files work the same way).

The folder is built once (`pipelines.data.scan.build`), shards indexed in parallel (a process pool, or any `map`
the caller passes, such as Ray tasks across a cluster), merged in one step, and moved into place whole.
`python -m pipelines.data.index URLS --out DIR` indexes shards this project did not write.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines import atomic
from pipelines.config import count
from pipelines.data.reader import DataError
from pipelines.data.sources import check_local_shards, is_local

INDEX_VERSION = 4  # bump when rows change. 4: RANGED shards; 3: columns of arrays, a sample's byte span; 2: multi-label
# `shard_seekable`, how a shard's samples are read. LOCAL: a local plain tar, by offset, by every reader. RANGED: a
# plain tar in object storage (`reader.OBJECT_STORES`): evaluation reads the samples it wants by byte-range requests,
# pretraining streams it whole (`reader.ShardFiles` says why). STREAMED: streamed only (a `pipe:` command is opaque;
# http(s) and compressed tars are read from their start).
STREAMED, LOCAL, RANGED = 0, 1, 2
SAMPLE_COLUMNS = {"offset": "<u8", "size": "<u4", "label": "<i4", "key": "<u8"}
SHARD_COLUMNS = {"shard_end": "<u8", "shard_lost": "<u4", "shard_seekable": "u1"}
Mapper = Callable[[Callable, list], Iterable]  # map(fn, jobs) -> results in job order


def key_hash(keys: list[str]) -> np.ndarray:
    """u8 hashes of sample keys (64-bit BLAKE2b): what the index keeps of a key."""
    return np.frombuffer(b"".join(hashlib.blake2b(k.encode(), digest_size=8).digest() for k in keys) or b"",
                         dtype="<u8").copy()


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
        """The shard each row in `positions` lies in (shard ends cast to the rows' type: unsigned ends against signed
        rows would make numpy cast both to float64, a copy of the rows)."""
        positions = np.asarray(positions)
        return np.searchsorted(np.asarray(self.shard_end).astype(positions.dtype), positions, side="right")

    @property
    def reads_rows(self) -> bool:
        """Whether evaluation reads the rows it wants of every shard alone (LOCAL or RANGED shards), so a sparse set
        of rows costs its own bytes; False where some shard can only be streamed, and a sparse set should be whole
        shards (a pass then opens only those)."""
        return bool(np.all(np.asarray(self.shard_seekable) != STREAMED))

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
        """Sample keys, read back from the tar headers of seekable (LOCAL, RANGED) shards (for messages and tests,
        not hot paths)."""
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

    def first_rows(self, seed: int, n: int, skip: np.ndarray | None = None) -> np.ndarray:
        """The `n` rows first in `order(seed)` that are not in `skip` (sorted rows: a held-out slice), sorted: stored
        beside the index (`subset-<seed>-<n>.bin`, `subset-<seed>-<n>-skip<hash of skip>.bin`) once, then
        memory-mapped, so every rank and loader worker of every trial of the point shares one copy."""
        if skip is None or not len(skip):
            return self._stored(f"subset-{seed}-{n}", lambda: np.sort(np.asarray(self.order(seed)[:n])))
        tag = hashlib.sha256(np.asarray(skip, dtype="<u8").tobytes()).hexdigest()[:12]
        return self._stored(f"subset-{seed}-{n}-skip{tag}", lambda: np.sort(_first_outside(self.order(seed), n, skip)))

    def smallest_keys(self, n: int) -> np.ndarray:
        """The `n` rows of smallest key hash, sorted: a uniform draw (the hash is BLAKE2b) that is a pure function of
        the source's key set, whatever the shard order or seed. O(N) once, stored beside the index
        (`smallest-<n>.bin`)."""
        return self._stored(f"smallest-{n}", lambda: np.sort(np.argpartition(np.asarray(self.key), n - 1)[:n]))

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


def _first_outside(order: np.ndarray, n: int, skip: np.ndarray) -> np.ndarray:
    """The first `n` rows of `order` not in `skip`: all among its first n + len(skip), of which at most len(skip) are
    skipped (O(n + len(skip)), not O(N))."""
    head = np.asarray(order[:n + len(skip)])
    return head[~np.isin(head, skip)][:n]


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
        from pipelines.data.scan import build

        sidecars = not args.no_sidecars
        if sidecars:  # beside the shards: a read-only data mount takes none, and the index is all that is asked
            folders = dict.fromkeys(os.path.dirname(os.path.abspath(u)) for u in shards if is_local(u))
            if blocked := next(((f, why) for f in folders if (why := atomic.folder_problem(Path(f)))), None):
                sidecars = False
                print(f"note: no sidecars written: {blocked[0]} {blocked[1]} (--no-sidecars says this is meant)",
                      file=sys.stderr)
        index = build(shards, Path(args.out), workers=args.workers, duplicates=args.duplicates,
                      write_sidecars=sidecars, progress=True)
    except (DataError, OSError) as err:  # OSError: --out cannot be written (a full disk, a read-only folder)
        print(f"error: {err}", file=sys.stderr)
        return 2
    meta = index.meta
    print(f"{count(meta['num_samples'], 'sample')} in {count(meta['num_shards'], 'shard')} indexed in "
          f"{meta['build_seconds']:.1f} s "
          f"({meta['num_samples'] / max(meta['build_seconds'], 1e-9):,.0f} samples/s): {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

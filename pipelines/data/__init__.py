"""Data sources behind one interface: `prepare` a source (generate, convert or check its shards, and index them once
into a `SourceIndex`), take a `nested_subset` of its rows, then stream it (`pipelines.data.stream`, training) or
read it batch by batch (`pipelines.data.batches`, evaluation)."""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from tqdm import tqdm

from pipelines import atomic
from pipelines.data import shapes
from pipelines.data.reader import BadCounts, BadSample, DataError
from pipelines.data.sources import (
    check_local_shards,
    info_files,
    info_lengths,
    info_listing,
    is_local,
    shard_identity,
    split_files,
    write_info,
)
from pipelines.data.writer import write_shard

if TYPE_CHECKING:
    from pipelines.data.index import Mapper, ShardSubset, SourceIndex

# `index` and `folder` (and `scan` and `batches`, which import `index`) are imported where they are used, not here:
# `python -m pipelines.data.index` (or `.folder`) imports this package first, and a package that had imported the
# module already would make runpy run a second copy of it as `__main__` (and warn so). `__getattr__` gives their
# names as attributes of this package all the same (a test patches them in their own module, where they are read).
_LAZY = {**dict.fromkeys(("INDEX_VERSION", "Mapper", "ShardSubset", "SourceIndex", "rebased"), "index"),
         **dict.fromkeys(("folder_classes", "folder_files", "folder_to_shards"), "folder"),
         **dict.fromkeys(("eval_batches", "load", "split_batches"), "batches")}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = globals()[name] = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


SHARD_SIZE = 4096
SHAPES_LAYOUT = 2  # 2: `_info.json` in timm's layout (`sources.write_info`); the shards' bytes are unchanged


@dataclass(frozen=True)
class SourceConfig:
    """One dataset. `shapes` is generated here; `webdataset` reads the user's shards (`urls`, `test_urls`);
    `folder` reads ImageNet-style class folders (`root/<class>/<image>`, and `test_root`).

    `size` is the number of training examples the source holds: it is declared so a dry run can price a grid
    without touching the data, and checked against the shards when the data is read.
    """

    source: Literal["shapes", "webdataset", "folder"] = "shapes"
    name: str = ""
    size: int = 65536
    test_size: int = 0
    image_size: int = 32
    num_classes: int = 64
    seed: int = 0
    urls: str | None = None
    test_urls: str | None = None
    root: str | None = None
    test_root: str | None = None
    duplicates: Literal["refuse", "first"] = "refuse"  # a key in two places: refused, or the first copy kept

    def __post_init__(self):
        bad = [f"{key} must be {need} (got {value})" for key, value, ok, need in (
            ("size", self.size, self.size > 0, "> 0"), ("test_size", self.test_size, self.test_size >= 0, ">= 0"),
            ("image_size", self.image_size, self.image_size >= 8, ">= 8"),
            ("num_classes", self.num_classes, self.num_classes >= 2, ">= 2"),
            ("seed", self.seed, self.seed >= 0, ">= 0, as numpy's seeds are")) if not ok]
        if bad:
            raise ValueError("; ".join(bad))
        other = {"webdataset": ("root", "test_root", "folder"), "folder": ("urls", "test_urls", "webdataset")}
        if self.source in other:
            *keys, theirs = other[self.source]
            given = [k for k in keys if getattr(self, k)]
            if given:  # e.g. `urls=` added to a folder grid would otherwise be ignored, the folder still read
                raise ValueError(f"source '{self.source}' takes no {' or '.join(repr(k) for k in given)} (source "
                                 f"'{theirs}''s keys); set source: {theirs} to read that instead")
        if self.source == "webdataset" and not self.urls:
            raise ValueError("source 'webdataset' needs 'urls' (e.g. /data/in21k/{000000..001023}.tar)")
        if self.source == "folder" and not self.root:
            raise ValueError("source 'folder' needs 'root' (a folder of class folders), and 'test_root' for a task")
        if self.source == "shapes" and (self.urls or self.test_urls or self.root or self.test_root):
            raise ValueError("source 'shapes' is generated; it takes no 'urls' or 'root'")

    @property
    def label(self) -> str:
        return self.name or self.source


@dataclass
class ImageArrays:
    """A split held in memory: uint8 images [N, H, W, 3] and int64 labels [N] ([N, K], -1 padded, for a multi-label
    source: see `labels.label_array`)."""

    images: np.ndarray
    labels: np.ndarray
    keys: list[str] = field(default_factory=list)
    bad: dict[str, int] = field(default_factory=dict)  # unreadable samples skipped, per cause

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class Prepared:
    """A source made readable: per split ('train', and 'test' where there is one) its shards and its index."""

    label: str
    shards: dict[str, list[str]]
    indexes: dict[str, str]
    rebase: tuple[str, str] | None = None  # shards made in the driver's cache, found in this node's
    stamp: dict[str, dict | None] | None = None  # per split, what its files were when prepared (`data_stamp`)

    def index(self, split: str = "train") -> SourceIndex:
        from pipelines.data.index import SourceIndex

        return SourceIndex(self.indexes[split], self.rebase)

    def subset(self, split: str = "train") -> ShardSubset:
        """A whole split as a subset (evaluation reads all of it)."""
        from pipelines.data.index import ShardSubset

        index = self.index(split)
        return ShardSubset(index, np.arange(len(index), dtype=np.int64))

    def to_json(self, cache_dir: Path) -> str:
        return json.dumps({"label": self.label, "shards": self.shards, "indexes": self.indexes,
                           "cache_dir": str(Path(cache_dir).resolve()), "stamp": self.stamp})


def default_cache_dir() -> Path:
    return Path(os.environ.get("VITSCALE_CACHE", Path.home() / ".cache" / "vit-scaling"))


def prepare(src: SourceConfig, cache_dir: Path, index_root: Path | None = None, progress: bool = True,
            max_bad_fraction: float = 0.001, mapper: Mapper | None = None) -> Prepared:
    """Make the source readable: `shapes` generated once into `cache_dir` (keyed by everything that changes its
    pixels), `folder` class folders converted once into shards there, `webdataset` shards checked to exist; then
    every split indexed once into `index_root` (default `cache_dir/index`; a study passes its storage, which every
    node sees), keyed by the shards' identity (`sources.shard_identity`).

    The driver prepares every source before any trial starts, so a corrupt or truncated training shard (past
    `max_bad_fraction`), a repeated key or a declared size the shards do not hold is one DataError up front. It
    records what it prepared (`prepared`), so trials open the index without identifying a shard again.
    """
    cache_dir, root = Path(cache_dir), _index_root(cache_dir, index_root)
    shards, files = _shard_lists(src, cache_dir, progress)
    indexes = {split: str(cached_index(urls, root, mapper=mapper, progress=progress, duplicates=src.duplicates,
                                       identities=files[split] if src.source == "webdataset" else None))
               for split, urls in shards.items()}
    found = Prepared(src.label, shards, indexes, stamp=data_stamp(files))
    for split in shards:
        check_source(src, found.index(split), max_bad_fraction, split)
        check_classes(src, found.index(split), split)
    atomic.write_bytes(record_path(src, root), found.to_json(cache_dir).encode())
    return found


def prepared(src: SourceConfig, cache_dir: Path, index_root: Path | None = None) -> Prepared:
    """What the driver's `prepare` recorded for `src` (O(1): no shard is listed or identified again); shards that
    live in this node's cache (generated or converted) are made here if this node lacks them. Falls back to
    `prepare` where nothing is recorded (a plain Python process)."""
    from pipelines.data.index import rebased

    cache_dir, root = Path(cache_dir), _index_root(cache_dir, index_root)
    path = record_path(src, root)
    if not path.exists():
        return prepare(src, cache_dir, root, progress=False)
    raw = json.loads(path.read_text())
    raw["indexes"] = {split: str(root / Path(folder).name) for split, folder in raw["indexes"].items()}  # this node's
    if src.source == "webdataset":
        return Prepared(raw["label"], raw["shards"], raw["indexes"], stamp=raw.get("stamp"))
    # Generated or converted shards live in each node's cache, made there if this node has not made them yet.
    here, there = str(cache_dir.resolve()), raw["cache_dir"]
    rebase = (there, here) if here != there else None
    shards = {split: [rebased(s, rebase) for s in urls] for split, urls in raw["shards"].items()}
    if not os.path.exists(shards["train"][0]):
        if src.source == "folder":  # made where the driver's index says, whatever this node's copy's mtimes
            for split, (root,) in _check_folders(src).items():
                made, _ = _folder_shards(root, split, cache_dir, progress=False, dest=Path(shards[split][0]).parent)
                if [os.path.basename(u) for u in made] != [os.path.basename(u) for u in shards[split]]:
                    raise DataError(f"{root} on this node converts to {len(made)} shards, the driver's to "
                                    f"{len(shards[split])}: give every node the same files")
        else:
            _shard_lists(src, cache_dir, progress=False)
    return Prepared(raw["label"], shards, raw["indexes"], rebase, raw.get("stamp"))


def data_stamp(files: dict[str, list[list]]) -> dict[str, dict[str, str] | None]:
    """What each split of a source is, as two digests of its file identities: `files` of them whole (a local file's
    path or key, size and modification time; a remote shard's ETag or sidecar hash; the procedural source's
    generator settings), `sizes` of them without the local files' modification times. A point's record keeps the
    stamps of the splits it was trained or evaluated on, so a rerun on files changed since is caught
    (`study.plan.changed_data`); `sizes` alone equal says only the times changed (a copy or a touch, or a rewrite of
    the same size). Cheap at any scale: what indexing identifies anyway, no byte of an image read. None for a split
    with a remote shard known by its URL alone (no ETag or sidecar, or its look-up failed this time): it is not
    compared, rather than found changed by a look-up that failed."""
    def timeless(entry: list) -> list:  # a local file's [name, size, mtime]; a remote shard's [url, kind, tag]
        return entry[:2] if len(entry) == 3 and isinstance(entry[1], int) and isinstance(entry[2], int) else entry

    def digest(obj) -> str:
        return hashlib.sha256(json.dumps(obj).encode()).hexdigest()[:16]

    return {split: None if any(len(e) == 1 for e in entries) else
            {"files": digest(entries), "sizes": digest([timeless(e) for e in entries])}
            for split, entries in files.items()}


def _index_root(cache_dir: Path, index_root: Path | None) -> Path:
    return Path(index_root) if index_root is not None else Path(cache_dir) / "index"


def record_path(src: SourceConfig, root: Path) -> Path:
    from pipelines.data.index import INDEX_VERSION

    ident = json.dumps([INDEX_VERSION, {k: v for k, v in src.__dict__.items() if k != "name"}], sort_keys=True)
    return root / "prepared" / f"{hashlib.sha256(ident.encode()).hexdigest()[:20]}.json"


def cached_index(shards: list[str], root: Path, mapper: Mapper | None = None, progress: bool = False,
                 duplicates: str = "refuse", workers: int | None = None, identities: list[list] | None = None
                 ) -> Path:
    """The folder of `shards`' index under `root`, built there once (in parallel, moved into place whole) under a
    key made from the shards' identity (`shard_identities`, or `identities` where the caller has them): a local
    shard's path, size and modification time; a remote one's ETag or its sidecar's content hash. A rewritten shard
    changes the key, and so does `INDEX_VERSION`."""
    from pipelines.data import scan
    from pipelines.data.index import INDEX_VERSION

    ident = [f"index-v{INDEX_VERSION}", duplicates, *(identities or shard_identities(shards)),
             _listed_for_key(shards)]  # an `_info.json` saying what a cut shard lost changes the index too
    folder = Path(root) / hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:20]
    if not (folder / "meta.json").exists():
        scan.build(shards, folder, mapper=mapper, workers=workers, duplicates=duplicates, progress=progress)
    return folder


def shard_identities(shards: list[str]) -> list[list]:
    """`sources.shard_identity` of each shard, the remote ones looked up 16 at a time."""
    remote = [shard for shard in shards if not is_local(shard)]
    with ThreadPoolExecutor(max_workers=min(16, len(remote) or 1)) as pool:  # remote look-ups wait on the network
        found = dict(zip(remote, pool.map(shard_identity, remote), strict=True))
    return [found.get(s) or shard_identity(s) for s in shards]


def _listed_for_key(shards: list[str]) -> dict[str, int]:
    """What `_info.json` lists, as an index key holds it: for shards in one folder, that folder's whole listing by
    shard name (the form every index built so far was keyed with, so none is built again); for several folders,
    each shard's count from its own folder's file, by path."""
    if not shards or not is_local(shards[0]):
        return {}
    folders = {os.path.dirname(s) for s in shards if is_local(s)}
    if len(folders) == 1:
        return info_listing(Path(shards[0]).parent / "_info.json")
    return info_lengths(shards)


def check_source(src: SourceConfig, index: SourceIndex, max_bad_fraction: float = 0.001, split: str = "train"
                 ) -> None:
    """A split holds what the source declares of it (`size` for train; `test_size`, where given, for test), and
    truncated or corrupt tars lost at most `max_bad_fraction` of it (a test split's lost samples would silently
    shrink every evaluation's test set)."""
    held, lost = len(index), index.lost
    cuts = [int(s) for s in np.flatnonzero(index.shard_lost)]  # the shards a cut or corrupt tar made short
    cut = cuts[0] if lost else None
    key, declared = ("size", src.size) if split == "train" else ("test_size", src.test_size)
    if held < declared:
        # a cut tar's loss is known where `_info.json` lists its count; without, only its one cut sample is counted
        listed = info_lengths([index.shard_url(s) for s in range(index.num_shards)]) if lost else {}
        bound = "" if all(index.shard_url(s) in listed for s in cuts) else "at least "
        where = f" ({bound}{lost} lost to truncated or corrupt tars, first {index.shard_url(cut)})" if lost else ""
        shards = f"{index.num_shards} shard{'s' * (index.num_shards != 1)}"
        given = (src.urls or src.root) if split == "train" else (src.test_urls or src.test_root)
        its = "its" if split == "train" else f"its {split} split's"
        raise DataError(f"source '{src.label}' declares {key} {declared:,}, but {its} {shards} "
                        f"({given or 'generated'}) hold {held:,} readable samples{where}; "
                        + (merged_keys(index) or f"declare {key}: {held} or fewer"))
    bad = BadCounts(truncated_tar=lost)
    if lost:
        bad.first["truncated_tar"] = f"{index.shard_url(cut)} lost {int(index.shard_lost[cut])}"
    bad.check(held + lost, max_bad_fraction, f"indexing {src.label}" + ("" if split == "train" else f" ({split})"))


def merged_keys(index: SourceIndex, members: int = 1000) -> str | None:
    """Why a source may hold fewer samples than declared: webdataset cuts a member's key at the first '.' of its file
    name, so `img.0000.jpg` and `img.0001.jpg` are one sample `img`. Found from the first local shard's first
    `members` headers (no image read): a sample with several images. None where none is found."""
    import itertools

    from pipelines.data.index import LOCAL
    from pipelines.data.reader import IMAGE_EXTS, TarFormatError, iter_members, split_member_name

    if index.num_shards == 0 or index.shard_seekable[0] != LOCAL:
        return None
    url = index.shard_url(0)
    images: dict[str, list[str]] = {}
    with open(url, "rb") as f:
        size = os.fstat(f.fileno()).st_size

        def read_at(at: int, n: int) -> bytes:
            f.seek(at)
            return f.read(n)

        try:
            for m in itertools.islice(iter_members(read_at, size), members):
                key, ext = split_member_name(m.name)
                if ext.rpartition(".")[2] in IMAGE_EXTS:
                    images.setdefault(key, []).append(os.path.basename(m.name))
        except TarFormatError:  # a cut tar: what was read is enough
            pass
    merged = next((names for names in images.values() if len(names) > 1), None)
    if merged is None:
        return None
    return (f"members such as {merged[0]} and {merged[1]} are one sample: a key ends at the first '.' of a member's "
            f"name (webdataset's rule), so write each sample's members as <key>.<ext> with no '.' in the key")


def check_classes(src: SourceConfig, index: SourceIndex, split: str = "train") -> None:
    """Every sample's classes are among the `num_classes` the source declares (a class past them would fail the
    first batch that holds it, as an index out of the head's range)."""
    values = index.label_val if index.label_ptr is not None else index.label
    if len(values) == 0 or (top := int(np.max(values))) < src.num_classes:
        return
    at = int(np.argmax(values))
    row = at if index.label_ptr is None else int(np.searchsorted(index.label_ptr, at, side="right")) - 1
    shard = index.shard_url(int(index.shard_of(np.asarray([row]))[0]))
    try:
        which = f"sample '{index.keys_of([row])[0]}' in {shard}"
    except (OSError, DataError, BadSample):  # a shard that can only be streamed: its key is not read back here
        which = f"a sample in {shard}"
    raise DataError(f"source '{src.label}' ({split}): {which} has class {top}, but num_classes is {src.num_classes} "
                    f"(classes 0..{src.num_classes - 1}); set num_classes: {top + 1} if the source has that many, "
                    f"else fix its labels")


def _shard_lists(src: SourceConfig, cache_dir: Path, progress: bool
                 ) -> tuple[dict[str, list[str]], dict[str, list[list]]]:
    """Each split's shards, and the identities of the files its content comes from (`data_stamp`): the shards of a
    `webdataset` source, the images of a `folder` one (not the shards converted from them, which a cleared cache
    makes anew), the generator's key for `shapes`."""
    if src.source == "webdataset":
        splits = {"train": check_local_shards(src.urls)}
        if src.test_urls:
            splits["test"] = check_local_shards(src.test_urls)
        _check_info(src, splits["train"])
        return splits, {split: shard_identities(urls) for split, urls in splits.items()}
    if src.source == "folder":
        made = {split: _folder_shards(root, split, cache_dir, progress)
                for split, (root,) in _check_folders(src).items()}
        return {split: shards for split, (shards, _) in made.items()}, {split: f for split, (_, f) in made.items()}
    root = cache_dir / f"shapes-{_shapes_digest(src)}"
    if not (root / "_info.json").exists():
        _generate_shapes(src, root, progress)
    splits = {split: files for split in ("train", "test") if (files := split_files(root, split))}
    return splits, {split: [["shapes", split, *_shapes_pixels(src)]] for split in splits}


def _check_info(src: SourceConfig, shards: list[str]) -> None:
    """Where the shards come with an `_info.json` (timm's wds layout) in each of their folders, check the declared
    size against the train samples those files list together."""
    files = info_files(shards)
    if not files or not all(path.exists() for path in files):
        return
    held = [json.loads(path.read_text()).get("splits", {}).get("train", {}).get("num_samples") for path in files]
    if None in held or src.size <= sum(held):
        return
    where = str(files[0]) if len(files) == 1 else f"the _info.json files of its {len(files)} folders"
    raise DataError(f"source '{src.label}' declares size {src.size}, but {where} list{'s' * (len(files) == 1)} "
                    f"{sum(held)} train samples")


def _folder_shards(root: str, split: str, cache_dir: Path, progress: bool, dest: Path | None = None
                   ) -> tuple[list[str], list[list]]:
    """A class folder converted once into shards in the cache (keyed by its files' names, sizes and mtimes), so
    a `folder` source is read by the same reader, index and image path as every other source; and those files'
    [key, size, mtime] (none where `dest` is given). `dest`: where, if not under that key (a node converts into the
    driver's folder, whose index it reads: its own copy of the files may carry other mtimes; the same files give
    the same tar layout)."""
    from pipelines.data.folder import folder_files, folder_to_shards, warn_broken

    files, stats = folder_files(root), []
    if dest is None:
        stats = [[key, (st := os.stat(path)).st_size, st.st_mtime_ns] for key, path in files]
        ident = [os.path.abspath(root), split] + stats
        dest = cache_dir / f"folder-{hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:12]}"
    if not (dest / "_info.json").exists():
        with atomic.folder(dest) as tmp:
            folder_to_shards(root, tmp, split, progress=progress)  # warns of broken files
    elif progress:
        warn_broken(root, dest, len(files))
    names = json.loads((dest / "_info.json").read_text())["splits"][split]["filenames"]
    return [str(dest / name) for name in names], stats


def _shapes_pixels(src: SourceConfig) -> list:
    """What decides the procedural source's images and labels (not how its shards are laid out)."""
    return [shapes.GENERATOR_VERSION, src.seed, src.size, src.test_size, src.image_size, src.num_classes]


def _shapes_digest(src: SourceConfig) -> str:
    ident = [*_shapes_pixels(src), SHAPES_LAYOUT]
    return hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:12]


def _generate_shapes(src: SourceConfig, root: Path, progress: bool) -> None:
    with atomic.folder(root) as tmp:
        jobs, names = [], {}
        for split, count in (("train", src.size), ("test", src.test_size)):
            names[split] = []
            for start in range(0, count, SHARD_SIZE):
                names[split].append(f"{split}-{start // SHARD_SIZE:06d}.tar")
                jobs.append((src, split, start, min(start + SHARD_SIZE, count), tmp / names[split][-1]))
        with ProcessPoolExecutor(max_workers=min(len(jobs), os.cpu_count() or 1)) as pool:
            done = pool.map(_write_shapes_shard, jobs)
            for _ in tqdm(done, total=len(jobs), desc=f"generating {src.label} shards", unit="shard",
                          disable=not progress):
                pass
        for split, count in (("train", src.size), ("test", src.test_size)):
            if count:
                write_info(tmp, split, names[split], [min(SHARD_SIZE, count - i * SHARD_SIZE)
                                                      for i in range(len(names[split]))],
                           name=src.label, num_classes=src.num_classes, image_size=src.image_size)


def _write_shapes_shard(job) -> int:
    src, split, start, stop, path = job
    samples = ((f"{i:08d}", *shapes.render(src.seed, split, i, src.num_classes, src.image_size))
               for i in range(start, stop))
    return write_shard(path, samples)


def nested_subset(index: SourceIndex, n: int, seed: int, mode: str = "samples",
                  held: ShardSubset | None = None) -> ShardSubset:
    """The nested subset of `n` rows for `data.subset_mode`: subset(n) contains every smaller subset, and is a pure
    function of (the source's keys, seed, n, `held`), whatever the shard order or the number of ranks. No row of
    `held` (the source's `held_out` slice) is ever in it: the subsets are drawn from the rows that remain.

    `samples`: the `n` rows first in the source's seeded key order (`SourceIndex.order`: O(N) once per (source,
    seed), then O(n log n) once per (seed, n), stored and memory-mapped: `SourceIndex.first_rows`). `shards`: whole
    shards in a seeded permutation of their names, each contributing its rows in tar order, the last one cut at
    `n`: a subset reads only the shards it covers (9M of a 300M-image source: 3%).
    """
    from pipelines.data.index import ShardSubset

    skip = np.asarray(held.positions) if held is not None else np.zeros(0, dtype=np.int64)
    if n > len(index) - len(skip):
        raise DataError(f"subset of {n} examples asked, but the source has only {len(index) - len(skip)}"
                        + (f" ({len(index)} less {len(skip)} held out for validation)" if len(skip) else ""))
    if mode == "samples":
        return ShardSubset(index, index.first_rows(seed, n, skip))
    names = sorted(range(index.num_shards), key=lambda i: os.path.basename(index.shard_url(i)))
    skip = np.sort(skip)  # once: each shard finds its held-out rows by bisection, not by a sort of the whole slice
    parts, taken = [], 0
    for i in np.random.default_rng([seed, 20210604]).permutation(len(names)):
        shard = names[i]
        start, end = index.shard_start(shard), int(index.shard_end[shard])
        rows = np.arange(start, end, dtype=np.int64)
        lo, hi = np.searchsorted(skip, [start, end])
        if hi > lo:
            keep = np.ones(len(rows), dtype=bool)
            keep[skip[lo:hi] - start] = False
            rows = rows[keep]
        parts.append(rows[:n - taken])
        taken += len(parts[-1])
        if taken == n:
            break
    return ShardSubset(index, np.sort(np.concatenate(parts)))


HELD_OUT_SEED = 20210605  # the held-out slice's shard order where shards can only be streamed (any fixed value)


def held_out(index: SourceIndex, n: int) -> ShardSubset:
    """The validation slice carved from a source without a test split (`data.holdout`): `n` rows that no
    `nested_subset` given it holds, a pure function of the source's keys and `n`, so the same for every point, seed,
    subset and number of ranks. Shards read by offset: the `n` rows of smallest key hash (a uniform draw,
    `SourceIndex.smallest_keys`, stored beside the index). Shards that can only be streamed: whole
    shards in a fixed seeded order of their names (`nested_subset`'s `shards` mode), so a validation pass streams
    those alone, not a sample of every shard."""
    from pipelines.data.index import ShardSubset

    if not 0 < n < len(index):
        raise DataError(f"a held-out slice of {n} rows asked of a source of {len(index)}: give 0 < data.holdout < "
                        f"{len(index)}")
    if index.reads_rows:
        return ShardSubset(index, index.smallest_keys(n))
    return nested_subset(index, n, HELD_OUT_SEED, mode="shards")


def manifest_hash(subset: ShardSubset) -> str:
    """Short content hash of a subset's key set (its rows' key hashes, sorted), logged with every trial."""
    return hashlib.sha256(np.sort(np.asarray(subset.index.key[subset.positions])).tobytes()).hexdigest()[:16]


def class_counts(labels: np.ndarray | ShardSubset, num_classes: int, chunk: int = 1 << 20) -> dict:
    """Per-class example counts of a (sub)set and their spread: small subsets are where imbalance bites.

    `labels` is int [n], or [n, k] for a multi-label source (-1 padded, see `shards.label_array`): a sample counts
    once for each of its classes. Unlabelled samples (label -1, skipped when read) are not counted. A subset is
    counted `chunk` rows at a time, so memory stays bounded whatever its size (a multi-label subset's padded labels
    would be n x k)."""
    parts = [labels] if isinstance(labels, np.ndarray) else (
        labels.part(slice(i, i + chunk)).labels for i in range(0, len(labels.positions), chunk))
    counts = np.zeros(num_classes, dtype=np.int64)
    for part in parts:
        found = np.bincount(part[part >= 0], minlength=num_classes)
        counts = np.pad(counts, (0, len(found) - len(counts))) + found  # a class past num_classes: counted too
    return {"counts": counts.tolist(), "min": int(counts.min()), "max": int(counts.max()),
            "empty_classes": int((counts == 0).sum())}


def _check_folders(src: SourceConfig) -> dict[str, list[str]]:
    from pipelines.data.folder import folder_classes

    splits = {"train": [src.root]} | ({"test": [src.test_root]} if src.test_root else {})
    classes = None
    for (path,) in splits.values():
        if not os.path.isdir(path):
            what = "is a file, not a folder" if os.path.exists(path) else "not found"
            raise DataError(f"data path {path} {what} (expected a folder of class folders)")
        found = folder_classes(path)
        if classes is not None and found != classes:
            raise DataError(f"{path} has classes {found[:5]}..., unlike the train folder's {classes[:5]}...")
        classes = found
    if len(classes) != src.num_classes:
        raise DataError(f"{src.root} has {len(classes)} class folders, but num_classes is {src.num_classes}")
    return splits


__all__ = ["DataError", "ImageArrays", "Prepared", "ShardSubset", "SourceConfig", "SourceIndex", "class_counts",
           "default_cache_dir", "eval_batches", "held_out", "load", "manifest_hash", "nested_subset", "prepare",
           "prepared", "split_batches"]

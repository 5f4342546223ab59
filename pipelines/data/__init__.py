"""Data sources behind one interface: `prepare` a source (generate or check shards), index it (`source_index`)
and take a `nested_subset` of its keys, then `load` a split into memory (evaluation) or stream it
(`pipelines.data.stream`, pretraining)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from PIL import Image
from tqdm import tqdm

from pipelines.data import shapes
from pipelines.data.augment import eval_image
from pipelines.data.shards import (
    INDEX_VERSION,
    BadCounts,
    DataError,
    ShardIndex,
    check_local_shards,
    folder_classes,
    folder_files,
    folder_to_shards,
    index_shards,
    is_local,
    iter_encoded,
    label_array,
    label_width,
    shard_identity,
    write_shard,
)

if TYPE_CHECKING:
    from pipelines.data.stream import ShardSubset

SHARD_SIZE = 4096


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

    def __post_init__(self):
        if self.size <= 0 or self.test_size < 0 or self.image_size < 8 or self.num_classes < 2:
            raise ValueError("need size > 0, test_size >= 0, image_size >= 8 and num_classes >= 2")
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
    source: see `shards.label_array`)."""

    images: np.ndarray
    labels: np.ndarray
    keys: list[str] = field(default_factory=list)
    bad: dict[str, int] = field(default_factory=dict)  # unreadable samples skipped, per cause

    def __len__(self) -> int:
        return len(self.labels)


def default_cache_dir() -> Path:
    return Path(os.environ.get("VITSCALE_CACHE", Path.home() / ".cache" / "vit-scaling"))


def prepare(src: SourceConfig, cache_dir: Path, progress: bool = True,
            max_bad_fraction: float = 0.001) -> dict[str, list[str]]:
    """Make the source readable and return its shard lists per split ('train', and 'test' if any).

    `shapes` is generated once into `cache_dir` (keyed by everything that changes its pixels); later calls
    and concurrent studies reuse it. `folder` class folders are converted once into shards there (keyed by their
    files' names, sizes and mtimes). `webdataset` shards are checked to exist.

    Every split is then indexed once into the cache (`cached_index`), so the driver, which prepares every source
    before any trial starts, finds a corrupt or truncated training shard (past `max_bad_fraction`) or a declared
    size the shards do not hold up front, as one DataError; trials read the cached index.
    """
    splits = _shard_lists(src, Path(cache_dir), progress)
    source_index(src, splits["train"], max_bad_fraction, cache_dir)
    if "test" in splits:
        cached_index(splits["test"], cache_dir)
    return splits


def _shard_lists(src: SourceConfig, cache_dir: Path, progress: bool) -> dict[str, list[str]]:
    if src.source == "webdataset":
        splits = {"train": check_local_shards(src.urls)}
        if src.test_urls:
            splits["test"] = check_local_shards(src.test_urls)
        _check_info(src, splits["train"][0])
        return splits
    if src.source == "folder":
        return {split: _folder_shards(root, split, cache_dir, progress)
                for split, (root,) in _check_folders(src).items()}
    root = cache_dir / f"shapes-{_shapes_digest(src)}"
    if not (root / "_info.json").exists():
        _generate_shapes(src, root, progress)
    info = json.loads((root / "_info.json").read_text())
    return {split: [str(root / name) for name in names] for split, names in info["shards"].items()}


def _folder_shards(root: str, split: str, cache_dir: Path, progress: bool) -> list[str]:
    """A class folder converted once into shards in the cache (keyed by its files' names, sizes and mtimes), so
    a `folder` source is read by the same reader, index and image path as every other source."""
    files = folder_files(root)
    ident = [os.path.abspath(root), split] + [(key, os.stat(path).st_size, os.stat(path).st_mtime_ns)
                                              for key, path in files]
    dest = cache_dir / f"folder-{hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:12]}"
    if not (dest / "_info.json").exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache_dir / f".{dest.name}.tmp{os.getpid()}"
        folder_to_shards(root, tmp, split, progress=progress)
        try:
            os.rename(tmp, dest)
        except OSError:  # another process converted the same folder first; theirs is identical
            shutil.rmtree(tmp, ignore_errors=True)
    info = json.loads((dest / "_info.json").read_text())
    return [str(dest / name) for name in info["splits"][split]["filenames"]]


def _shapes_digest(src: SourceConfig) -> str:
    ident = [shapes.GENERATOR_VERSION, src.seed, src.size, src.test_size, src.image_size, src.num_classes]
    return hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:12]


def _generate_shapes(src: SourceConfig, root: Path, progress: bool) -> None:
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp{os.getpid()}"
    tmp.mkdir()
    jobs, names = [], {}
    for split, count in (("train", src.size), ("test", src.test_size)):
        names[split] = []
        for start in range(0, count, SHARD_SIZE):
            name = f"{split}-{start // SHARD_SIZE:06d}.tar"
            names[split].append(name)
            jobs.append((src, split, start, min(start + SHARD_SIZE, count), tmp / name))
    with ProcessPoolExecutor(max_workers=min(len(jobs), os.cpu_count() or 1)) as pool:
        done = pool.map(_write_shapes_shard, jobs)
        bar = tqdm(done, total=len(jobs), desc=f"generating {src.label} shards", unit="shard", disable=not progress)
        for _ in bar:
            pass
    info = {"name": src.label, "splits": {"train": src.size, "test": src.test_size}, "shards": names,
            "num_classes": src.num_classes, "image_size": src.image_size}
    (tmp / "_info.json").write_text(json.dumps(info, indent=1))
    try:
        os.rename(tmp, root)
    except OSError:  # another process finished the same cache first; theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)


def _write_shapes_shard(job) -> int:
    src, split, start, stop, path = job
    samples = ((f"{i:08d}", *shapes.render(src.seed, split, i, src.num_classes, src.image_size))
               for i in range(start, stop))
    return write_shard(path, samples)


def nested_subset(keys: list[str], n: int, seed: int) -> list[str]:
    """The first `n` keys of a seeded permutation of all keys: subset(n) contains every smaller subset.

    A pure function of (seed, n, the source's key set): keys are sorted first, so shard order is irrelevant.
    """
    if n > len(keys):
        raise DataError(f"subset of {n} examples asked, but the source has only {len(keys)}")
    ordered = sorted(keys)
    perm = np.random.default_rng([seed, 20210603]).permutation(len(ordered))
    return sorted(ordered[i] for i in perm[:n])


def nested_shard_subset(index: ShardIndex, n: int, seed: int) -> list[str]:
    """`n` keys taken whole shard by whole shard (`data.subset_mode: shards`): shards in a seeded permutation of
    their names, each contributing its samples in tar order, the last one cut at `n`. Nested by construction
    (subset(n) is a prefix of subset(m) for n < m), deterministic, and independent of the shard list's order;
    a subset reads only the shards it covers (9M of a 300M-image source: 3% of its shards)."""
    held = sum(len(keys) for keys in index.keys)
    if n > held:
        raise DataError(f"subset of {n} examples asked, but the source has only {held}")
    names = sorted(range(len(index.shards)), key=lambda i: os.path.basename(index.shards[i]))
    order = [names[i] for i in np.random.default_rng([seed, 20210604]).permutation(len(names))]
    keys: list[str] = []
    for shard in order:
        keys += index.keys[shard][:n - len(keys)]
        if len(keys) == n:
            break
    return sorted(keys)


def subset_keys(index: ShardIndex, n: int, seed: int, mode: str = "samples") -> list[str]:
    """The nested subset of `n` keys for `data.subset_mode` `samples` (`nested_subset`) or `shards`."""
    if mode == "shards":
        return nested_shard_subset(index, n, seed)
    return nested_subset(index.all_keys, n, seed)


def manifest_hash(keys: list[str]) -> str:
    """Short content hash of a subset's key set, logged with every trial."""
    return hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()[:16]


def source_keys(src: SourceConfig, shards: list[str]) -> list[str]:
    """All training keys of a source; its declared `size` must not exceed what the shards hold."""
    return source_index(src, shards).all_keys


def source_index(src: SourceConfig, shards: list[str], max_bad_fraction: float = 0.001,
                 cache_dir: Path | None = None) -> ShardIndex:
    """The training shards' index; its declared `size` must not exceed what they hold, and samples lost to
    truncated or corrupt tars must stay within `max_bad_fraction`. With `cache_dir`, read from (or built once
    into) the index cache that `prepare` fills, so trials and ranks do not re-read the shards' headers."""
    index = cached_index(shards, cache_dir) if cache_dir is not None else index_shards(shards)
    held, lost = len(index.all_keys), sum(index.lost)
    if held < src.size:
        raise DataError(f"source '{src.label}' declares size {src.size} but its shards hold {held} readable samples"
                        + (f" ({lost} lost to truncated or corrupt tars)" if lost else ""))
    BadCounts(truncated_tar=lost).check(held + lost, max_bad_fraction, f"indexing {src.label}")
    return index


def cached_index(shards: list[str], cache_dir: Path) -> ShardIndex:
    """`index_shards(shards)`, built once and cached in `cache_dir/index/` under a key made from the shards'
    identity (`shard_identity`): a local shard's path, size and modification time; a remote one's ETag or its
    sidecar's content hash. A rewritten shard, local or remote, changes the key, and so does `INDEX_VERSION` (an
    index an older reader built is rebuilt)."""
    remote = [shard for shard in shards if not is_local(shard)]
    with ThreadPoolExecutor(max_workers=min(16, len(remote) or 1)) as pool:  # remote look-ups wait on the network
        found = dict(zip(remote, pool.map(shard_identity, remote), strict=True))
    ident = [found[shard] if shard in found else shard_identity(shard) for shard in shards]
    ident = [f"index-v{INDEX_VERSION}", *ident]  # version 1 indexes were keyed by the shards alone
    path = Path(cache_dir) / "index" / f"{hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:20]}.json"
    if path.exists():
        return ShardIndex.from_json(path.read_text())
    index = index_shards(shards)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(index.to_json())
    os.replace(tmp, path)  # atomic: concurrent builders write the same content
    return index


def _check_info(src: SourceConfig, first_shard: str) -> None:
    """Where the shards come with an `_info.json` (timm's wds layout), check the declared size against it."""
    info_path = Path(first_shard).parent / "_info.json"
    if not is_local(first_shard) or not info_path.exists():
        return
    held = json.loads(info_path.read_text()).get("splits", {}).get("train", {}).get("num_samples")
    if held is not None and src.size > held:
        raise DataError(f"source '{src.label}' declares size {src.size}, but {info_path} lists {held} train samples")


def class_counts(labels: np.ndarray, num_classes: int) -> dict:
    """Per-class example counts of a (sub)set and their spread: small subsets are where imbalance bites.

    `labels` is int [n], or [n, k] for a multi-label source (-1 padded, see `shards.label_array`): a sample counts
    once for each of its classes. Unlabelled samples (label -1, skipped when read) are not counted."""
    counts = np.bincount(labels[labels >= 0], minlength=num_classes)
    return {"counts": counts.tolist(), "min": int(counts.min()), "max": int(counts.max()),
            "empty_classes": int((counts == 0).sum())}


def _check_folders(src: SourceConfig) -> dict[str, list[str]]:
    splits = {"train": [src.root]} | ({"test": [src.test_root]} if src.test_root else {})
    classes = None
    for (path,) in splits.values():
        if not os.path.isdir(path):
            raise DataError(f"data path not found: {path} (expected a folder of class folders)")
        found = folder_classes(path)
        if classes is not None and found != classes:
            raise DataError(f"{path} has classes {found[:5]}..., unlike the train folder's {classes[:5]}...")
        classes = found
    if len(classes) != src.num_classes:
        raise DataError(f"{src.root} has {len(classes)} class folders, but num_classes is {src.num_classes}")
    return splits


def eval_batches(shards: list[str], image_size: int, batch_size: int = 256, keys: list[str] | None = None,
                 progress: bool = False, desc: str = "", max_bad_fraction: float = 0.001,
                 width: int | None = None) -> Iterator[ImageArrays]:
    """A split (or the samples named by `keys`) decoded batch by batch at `image_size`, in shard order: memory
    holds one batch, whatever the split's size.

    A `folder` source is read from the shards `prepare` converted it into. Images go through the evaluation
    transform of the training image path (`augment.eval_image`: shorter side resized, centre crop). Unreadable
    samples are counted per cause and skipped (each batch's `bad`: the running counts), up to `max_bad_fraction`
    of the samples expected; past it DataError names the causes. Labels are int64 [b], or [b, width] for a
    multi-label source (`width`: its `ShardIndex.label_width`; found from the index when the whole split is read,
    else from each batch).
    """
    wanted = set(keys) if keys is not None else None
    bad = BadCounts()
    if wanted is not None:
        expected = len(wanted)
    else:  # the whole split: what the tar headers list, plus what truncated tars lost
        index = index_shards(shards)
        expected = len(index.all_keys) + sum(index.lost)
        width = width or index.label_width
    samples = iter_encoded(shards, wanted, bad)
    where = f"loading {desc or (shards[0] if shards else 'an empty shard list')}"
    images, labels, names, read = [], [], [], 0
    for key, raw, label in tqdm(samples, total=expected, desc=desc or "loading", unit="img", disable=not progress,
                                mininterval=5):
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
            yield ImageArrays(np.stack(images), label_array(labels, width or label_width(labels)), names, dict(+bad))
            images, labels, names = [], [], []
    read += len(names)
    bad["truncated_tar"] += max(0, expected - read - sum(bad.values()))  # expected, neither read nor counted
    bad.check(expected, max_bad_fraction, where)
    if read == 0:
        raise DataError(f"no samples found in {shards[0] if shards else 'an empty shard list'}")
    if names:
        yield ImageArrays(np.stack(images), label_array(labels, width or label_width(labels)), names, dict(+bad))


def load(shards: list[str], image_size: int, keys: list[str] | None = None, progress: bool = False,
         desc: str = "", max_bad_fraction: float = 0.001) -> ImageArrays:
    """A split (or the samples named by `keys`) in memory: `eval_batches` joined. For the few places that need
    the pixels at once (the Fig 7 probe images); evaluation streams."""
    parts = list(eval_batches(shards, image_size, 1024, keys, progress, desc, max_bad_fraction))
    return ImageArrays(np.concatenate([p.images for p in parts]), _join_labels([p.labels for p in parts]),
                       [k for p in parts for k in p.keys], parts[-1].bad)


def _join_labels(parts: list[np.ndarray]) -> np.ndarray:
    """Batches' labels joined; multi-label batches of different widths padded to the widest with -1."""
    if all(p.ndim == 1 for p in parts):
        return np.concatenate(parts)
    width = max(p.shape[1] if p.ndim == 2 else 1 for p in parts)
    out = np.full((sum(len(p) for p in parts), width), -1, dtype=np.int64)
    row = 0
    for p in parts:
        p = p.reshape(len(p), -1)
        out[row:row + len(p), :p.shape[1]] = p
        row += len(p)
    return out


def split_batches(split: ImageArrays | ShardSubset, image_size: int, batch_size: int = 256,
                  max_bad_fraction: float = 0.001) -> Iterator[ImageArrays]:
    """Evaluation batches of a split held in memory (as stored; the model input resizes) or left in shards
    (decoded at `image_size` batch by batch, see `eval_batches`)."""
    if isinstance(split, ImageArrays):
        for start in range(0, len(split), batch_size):
            stop = start + batch_size
            yield ImageArrays(split.images[start:stop], split.labels[start:stop], split.keys[start:stop])
        return
    yield from eval_batches(split.index.shards, image_size, batch_size, split.keys,
                            max_bad_fraction=max_bad_fraction, width=split.index.label_width)

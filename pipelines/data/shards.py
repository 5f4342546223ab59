"""webdataset tar shards: the one on-disk format. Procedural data is written as shards and read back through
the same reader that reads a user's ImageNet-21k shards (timm / img2dataset layout: image + `.cls`)."""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import braceexpand
import numpy as np
import webdataset as wds
from PIL import Image

from pipelines.config import UserError

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")


class DataError(UserError):
    """Data that cannot be read: a missing path, a corrupt shard, a sample without its label."""


def expand_urls(urls: str) -> list[str]:
    """Brace-expand a shard spec (`/data/in21k/{000000..001023}.tar`); ';' separates several specs."""
    out: list[str] = []
    for spec in urls.split(";"):
        out.extend(braceexpand.braceexpand(spec.strip()))
    return out


def check_local_shards(urls: str) -> list[str]:
    """Expanded shard list; local paths must exist (remote `pipe:`/`s3://` URLs are left to webdataset)."""
    shards = expand_urls(urls)
    local = [u for u in shards if "://" not in u and not u.startswith("pipe:")]
    missing = [u for u in local if not os.path.exists(u)]
    if missing:
        raise DataError(f"data path not found: {missing[0]} ({len(missing)} of {len(shards)} shards missing)")
    return shards


def encode_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def write_shard(path: Path, samples: Iterable[tuple[str, np.ndarray, int]]) -> int:
    """Write (key, uint8 image, label) samples to one tar atomically (temp file + rename).

    Returns:
        number of samples written.
    """
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    count = 0
    with wds.TarWriter(str(tmp)) as sink:
        for key, image, label in samples:
            sink.write({"__key__": key, "png": encode_png(image), "cls": str(label).encode()})
            count += 1
    os.replace(tmp, path)
    return count


def list_keys(shards: list[str]) -> list[str]:
    """Sample keys in shard order, read from tar headers only (no image decoding)."""
    keys: list[str] = []
    for shard in shards:
        seen: set[str] = set()
        try:
            with tarfile.open(shard, "r|*") as tar:
                for member in tar:
                    key = _split_member_name(member.name)[0]
                    if key not in seen:
                        seen.add(key)
                        keys.append(key)
        except (tarfile.TarError, OSError) as err:
            raise DataError(f"corrupt or unreadable shard {shard}: {err}") from None
    return keys


def _split_member_name(name: str) -> tuple[str, str]:
    base = os.path.basename(name)
    stem, _, ext = base.partition(".")
    return os.path.join(os.path.dirname(name), stem), ext.lower()


def iter_samples(shards: list[str], keys: set[str] | None = None) -> Iterator[tuple[str, np.ndarray, int]]:
    """Decoded (key, RGB uint8 image, label) for each sample (optionally only those in `keys`)."""
    dataset = wds.WebDataset(shards, shardshuffle=False, empty_check=False, handler=_reraise)
    for sample in dataset:
        key = sample["__key__"]
        if keys is not None and key not in keys:
            continue
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if ext is None or "cls" not in sample:
            raise DataError(f"sample '{key}' in {sample.get('__url__')} lacks an image or a .cls label")
        try:
            with Image.open(io.BytesIO(sample[ext])) as im:
                image = np.asarray(im.convert("RGB"))
        except OSError as err:
            raise DataError(f"cannot decode image of sample '{key}' in {sample.get('__url__')}: {err}") from None
        yield key, image, int(sample["cls"])


def _reraise(exn: Exception) -> bool:
    raise DataError(f"corrupt shard: {exn}") from None


def folder_classes(root: str) -> list[str]:
    """Class names of an ImageNet-style folder (`root/<class>/<image>`), sorted: label i is the i-th name."""
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


def folder_files(root: str) -> list[tuple[str, str]]:
    """(key, path) of every image under `root/<class>/`, key = '<class>/<file stem>', in sorted order."""
    out = []
    for name in folder_classes(root):
        for entry in sorted(os.scandir(os.path.join(root, name)), key=lambda e: e.name):
            stem, _, ext = entry.name.rpartition(".")
            if entry.is_file() and ext.lower() in IMAGE_EXTS:
                out.append((f"{name}/{stem}", entry.path))
    return out


def iter_folder(root: str) -> Iterator[tuple[str, np.ndarray, int]]:
    """Decoded (key, RGB uint8 image, label) for every image of an ImageNet-style folder."""
    labels = {name: i for i, name in enumerate(folder_classes(root))}
    for key, path in folder_files(root):
        try:
            with Image.open(path) as im:
                image = np.asarray(im.convert("RGB"))
        except OSError as err:
            raise DataError(f"cannot decode image {path}: {err}") from None
        yield key, image, labels[key.split("/", 1)[0]]

"""webdataset tar shards: the one on-disk format. Procedural data is written as shards and read back through
the same reader that reads a user's ImageNet-21k shards (timm / img2dataset layout: image + `.cls`)."""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import braceexpand
import numpy as np
import webdataset as wds
from PIL import Image
from tqdm import tqdm

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


def iter_folder(root: str, keys: set[str] | None = None) -> Iterator[tuple[str, np.ndarray, int]]:
    """Decoded (key, RGB uint8 image, label) for every image of an ImageNet-style folder (or those in `keys`)."""
    labels = {name: i for i, name in enumerate(folder_classes(root))}
    for key, path in folder_files(root):
        if keys is not None and key not in keys:
            continue
        try:
            with Image.open(path) as im:
                image = np.asarray(im.convert("RGB"))
        except OSError as err:
            raise DataError(f"cannot decode image {path}: {err}") from None
        yield key, image, labels[key.split("/", 1)[0]]


def folder_to_shards(root: str, out: Path, split: str = "train", shard_size: int = 1000, seed: int = 0,
                     progress: bool = True) -> dict:
    """Write an ImageNet-style folder as webdataset shards `<split>-NNNNNN.tar`, plus `classes.json` (label ->
    class name) and `_info.json` (split sizes and shard lengths, the layout timm's wds reader reads).

    Image bytes are copied verbatim (no re-encoding, so pixels are identical); samples are shuffled with `seed`
    so that shard prefixes are class-mixed; each sample carries a `.json` with its source path and class.
    """
    files = folder_files(root)
    if not files:
        raise DataError(f"no images found under {root} (expected {root}/<class>/<image>)")
    classes = folder_classes(root)
    labels = {name: i for i, name in enumerate(classes)}
    order = np.random.default_rng(seed).permutation(len(files))
    out.mkdir(parents=True, exist_ok=True)
    names, lengths = [], []
    bar = tqdm(total=len(files), desc=f"{root} -> shards", unit="img", disable=not progress, mininterval=2)
    for start in range(0, len(files), shard_size):
        name = f"{split}-{start // shard_size:06d}.tar"
        tmp = out / f".{name}.tmp{os.getpid()}"
        with wds.TarWriter(str(tmp)) as sink:
            for i in order[start:start + shard_size]:
                key, path = files[i]
                cls = key.split("/", 1)[0]
                ext = path.rpartition(".")[2].lower()
                with open(path, "rb") as f:
                    data = f.read()
                sink.write({"__key__": f"{i:09d}", "jpg" if ext == "jpeg" else ext: data,
                            "cls": str(labels[cls]).encode(),
                            "json": json.dumps({"path": os.path.relpath(path, root), "class": cls}).encode()})
                bar.update(1)
        os.replace(tmp, out / name)
        names.append(name)
        lengths.append(len(order[start:start + shard_size]))
    bar.close()
    (out / "classes.json").write_text(json.dumps(classes, indent=0))
    info_path = out / "_info.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {"name": Path(root).name, "splits": {}}
    info["num_classes"] = len(classes)
    info["splits"][split] = {"num_samples": len(files), "filenames": names, "shard_lengths": lengths,
                             "shuffle_seed": seed}
    info_path.write_text(json.dumps(info, indent=1))
    return info


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m pipelines.data.shards",
                                     description="Convert an ImageNet-style folder (root/<class>/<image>) to shards.")
    parser.add_argument("--from-folder", required=True, help="folder of class folders")
    parser.add_argument("--out", required=True, help="output folder for the shards, classes.json and _info.json")
    parser.add_argument("--split", default="train", help="split name: shard prefix and _info.json entry")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    args = parser.parse_args(argv)
    try:
        if not os.path.isdir(args.from_folder):
            raise DataError(f"data path not found: {args.from_folder} (expected a folder of class folders)")
        info = folder_to_shards(args.from_folder, Path(args.out), args.split, args.shard_size)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    split = info["splits"][args.split]
    print(f"{split['num_samples']:,} samples of {info['num_classes']} classes in {len(split['filenames'])} shards: "
          f"{args.out}/{args.split}-{{000000..{len(split['filenames']) - 1:06d}}}.tar")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

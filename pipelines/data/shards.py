"""webdataset tar shards: the one on-disk format. Procedural data is written as shards and read back through
the same reader that reads a user's ImageNet-21k shards (timm / img2dataset layout: image + `.cls`)."""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import tarfile
import urllib.request
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
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


# A sample's label: one class (int; -1 where it has none), or, multi-label (JFT, ImageNet-21k winter release), the
# sorted list of its two or more classes. Bump INDEX_VERSION when what the index holds changes: it is part of the
# index cache key and of every sidecar, so an index built by an older reader is rebuilt, never misread.
Label = int | list[int]
INDEX_VERSION = 2  # 2: multi-label `.cls` and `.json` `labels`


def parse_labels(cls: bytes | None, meta: bytes | None) -> Label | None:
    """A sample's label from its `.cls` (one or more integers, whitespace- or comma-separated) and its `.json`'s
    `labels` list, merged: an int for one class, a sorted list for several, -1 for none; None where either member
    holds something that is not a class (a non-integer or negative `.cls` entry or `labels` item)."""
    found: set[int] = set()
    if cls is not None:
        try:
            found.update(int(v) for v in cls.replace(b",", b" ").split())
        except ValueError:
            return None
    if meta is not None and b'"labels"' in meta:
        try:
            listed = json.loads(meta).get("labels")
        except (ValueError, AttributeError):
            listed = None
        if listed is not None:
            if not isinstance(listed, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in listed):
                return None
            found.update(listed)
    if any(v < 0 for v in found):
        return None
    return -1 if not found else found.pop() if len(found) == 1 else sorted(found)


def label_array(labels: list[Label], width: int = 1) -> np.ndarray:
    """Labels as int64: [n] where `width` is 1 (single-label sources, as always), else [n, width], each row a
    sample's classes padded with -1 (the loss builds the multi-hot target on the device)."""
    if width == 1:
        return np.asarray(labels, dtype=np.int64)
    out = np.full((len(labels), width), -1, dtype=np.int64)
    for row, label in zip(out, labels, strict=True):
        classes = label if isinstance(label, list) else [label]
        row[:len(classes)] = classes
    return out


def label_width(labels: Iterable[Label]) -> int:
    """The most classes any of `labels` carries (1 for a single-label source)."""
    return max((len(label) for label in labels if isinstance(label, list)), default=1)


def expand_urls(urls: str) -> list[str]:
    """Brace-expand a shard spec (`/data/in21k/{000000..001023}.tar`); ';' separates several specs."""
    out: list[str] = []
    for spec in urls.split(";"):
        out.extend(braceexpand.braceexpand(spec.strip()))
    return out


def is_local(url: str) -> bool:
    """A plain file path, as opposed to a URL or a `pipe:` command that only webdataset's `gopen` can open."""
    return "://" not in url and not url.startswith("pipe:")


def check_local_shards(urls: str) -> list[str]:
    """Expanded shard list; local paths must exist (remote `pipe:`/`s3://` URLs are left to webdataset)."""
    shards = expand_urls(urls)
    local = [u for u in shards if is_local(u)]
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
    write_sidecar(path)
    return count


SIDECAR = ".idx.json"  # `<shard>.tar.idx.json`: the shard's index (keys, labels, offsets) beside it


def sidecar_url(url: str) -> str:
    """Where a shard's sidecar index lives: its URL (or `pipe:` command) with the last `.tar` -> `.tar.idx.json`."""
    head, dot, tail = url.rpartition(".tar")
    return f"{head}{dot}{SIDECAR}{tail}" if dot else url + SIDECAR


def write_sidecar(path: Path) -> None:
    """Index a local shard just written and store it beside it, so a remote copy is indexed without reading it."""
    index = index_shards([str(path)], sidecars=False)
    side = {"version": INDEX_VERSION, "keys": index.keys[0], "labels": index.labels[0],
            "spans": index.spans[0].tolist(), "size": os.path.getsize(path)}
    tmp = Path(sidecar_url(str(path)) + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(side))
    os.replace(tmp, sidecar_url(str(path)))


def _read_sidecar(url: str) -> dict | None:
    """A remote shard's sidecar index, or None where there is none or an older reader wrote it (which read no
    multi-label samples): the shard is then streamed to index it."""
    try:
        with wds.gopen(sidecar_url(url)) as f:
            side = json.loads(f.read())
        usable = isinstance(side, dict) and {"keys", "labels"} <= set(side) and side.get("version") == INDEX_VERSION
        return side if usable else None
    except (OSError, ValueError):
        return None


def shard_identity(url: str) -> list:
    """What identifies a shard's content, for the key of its cached index (a changed shard gets a new key).

    A local file: its path, size and modification time. An http(s) shard: its ETag (else Last-Modified and
    Content-Length), from a HEAD request. Any other remote shard (`pipe:` commands, how object stores are read):
    the content hash of its sidecar index, which the shard writers rewrite with the shard. A remote shard with none
    of these is known by its URL alone (assumed immutable, as versioned object-store paths are).
    """
    if is_local(url):
        st = os.stat(url)
        return [os.path.abspath(url), st.st_size, st.st_mtime_ns]
    if url.startswith(("http://", "https://")):
        tag = _http_tag(url)
        if tag:
            return [url, "etag", tag]
    try:
        with wds.gopen(sidecar_url(url)) as f:
            return [url, "sidecar", hashlib.sha256(f.read()).hexdigest()]
    except (OSError, ValueError):
        return [url]


def _http_tag(url: str) -> str | None:
    request = urllib.request.Request(url, method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            headers = response.headers
    except (OSError, ValueError):  # URLError and HTTPError are OSErrors
        return None
    if headers.get("ETag"):
        return headers["ETag"]
    if headers.get("Last-Modified"):
        return f"{headers['Last-Modified']} {headers.get('Content-Length', '')}"
    return None


BAD_CAUSES = ("truncated_tar", "empty_member", "missing_label", "missing_image", "undecodable_image",
              "checksum_mismatch")


class BadSample(Exception):
    """One unreadable sample; `cause` is one of BAD_CAUSES. Counted and skipped by the readers."""

    def __init__(self, cause: str, message: str):
        super().__init__(message)
        self.cause = cause


@dataclass
class ShardIndex:
    """Sample keys and labels per shard, in tar order, read from tar headers and the `.cls` and `.json` members
    only (no image is read or decoded). Labels as `parse_labels` gives them: an int, or a list of several classes
    for a multi-label sample; -1 where a sample has none.

    `lost[i]` counts samples of shard i that cannot be read because the tar ends early or is corrupt: the
    shortfall against `_info.json`'s `shard_lengths` where the shards have one, else the one sample whose
    members were cut.

    `spans[i]` (local shards only, else None): per sample, the byte offset and size of its image and of its `.json`
    (-1 where absent), so a reader seeks straight to the samples it wants.
    """

    shards: list[str]
    keys: list[list[str]]
    labels: list[list[Label]]
    lost: list[int]
    spans: list[np.ndarray | None] = field(default_factory=list)

    @property
    def all_keys(self) -> list[str]:
        return [key for shard in self.keys for key in shard]

    @cached_property
    def label_width(self) -> int:
        """The most classes one sample carries: 1 for a single-label source, >1 for a multi-label one."""
        return max((label_width(labels) for labels in self.labels), default=1)

    def label_of(self) -> dict[str, Label]:
        return {k: c for keys, labels in zip(self.keys, self.labels, strict=True)
                for k, c in zip(keys, labels, strict=True)}

    def to_json(self) -> str:
        spans = [None if s is None else s.tolist() for s in self.spans]
        return json.dumps({"shards": self.shards, "keys": self.keys, "labels": self.labels, "lost": self.lost,
                           "spans": spans})

    @classmethod
    def from_json(cls, text: str) -> ShardIndex:
        raw = json.loads(text)
        spans = [None if s is None else np.asarray(s, dtype=np.int64).reshape(-1, 4) for s in raw["spans"]]
        return cls(raw["shards"], raw["keys"], raw["labels"], raw["lost"], spans)


def index_shards(shards: list[str], progress: bool = False, sidecars: bool = True) -> ShardIndex:
    """Read every shard's tar headers and labels (seeking over image data in local files) into a ShardIndex.

    A remote shard (`pipe:`, URLs) with a sidecar index (`sidecar_url`, written by this project's shard writers)
    is indexed from the sidecar alone, without downloading the shard.
    """
    lengths = _info_lengths(shards)
    index = ShardIndex(list(shards), [], [], [], [])
    for shard in tqdm(shards, desc="indexing shards", unit="shard", disable=not progress, mininterval=5):
        side = _read_sidecar(shard) if sidecars and not is_local(shard) else None
        if side is not None:
            index.keys.append(list(side["keys"]))
            index.labels.append(list(side["labels"]))
            index.spans.append(None)
            index.lost.append(0)
            continue
        keys: list[str] = []
        members: list[list[bytes | None]] = []  # per sample: its `.cls`, and its `.json` where it lists labels
        spans: list[list[int]] = []
        truncated, cut = False, None
        local = is_local(shard)
        try:
            end = os.path.getsize(shard) if local else math.inf
            with (tarfile.open(shard, "r:*") if local else tarfile.open(fileobj=wds.gopen(shard), mode="r|*")) as tar:
                for member in tar:
                    key, ext = _split_member_name(member.name)
                    cut = key
                    if member.offset_data + member.size > end:  # seeking past the end raises nothing: check
                        raise EOFError(f"{member.name} ends past the end of the file")
                    if not member.isfile():
                        continue
                    if not keys or keys[-1] != key:
                        keys.append(key)
                        members.append([None, None])
                        spans.append([-1, -1, -1, -1])
                    if ext == "cls":
                        members[-1][0] = tar.extractfile(member).read()
                    elif ext in IMAGE_EXTS and spans[-1][0] < 0:
                        spans[-1][:2] = member.offset_data, member.size
                    elif ext == "json":
                        spans[-1][2:] = member.offset_data, member.size
                        meta = tar.extractfile(member).read()
                        members[-1][1] = meta if b'"labels"' in meta else None
                # Every tar writer ends with two zero blocks; without them the file was cut between members.
                truncated = tar.offset + 2 * tarfile.BLOCKSIZE > end
        except (tarfile.TarError, OSError, EOFError):
            truncated = True
            if keys and keys[-1] == cut:  # the sample being read when the tar ended may have lost members
                keys, members, spans = keys[:-1], members[:-1], spans[:-1]
        expected = lengths.get(os.path.basename(shard))
        index.keys.append(keys)
        index.labels.append([_or_unlabelled(parse_labels(cls, meta)) for cls, meta in members])
        index.spans.append(np.asarray(spans, dtype=np.int64).reshape(-1, 4) if local else None)
        index.lost.append(max(expected - len(keys), 0) if expected is not None else int(truncated))
    return index


def _or_unlabelled(label: Label | None) -> Label:
    return -1 if label is None else label  # an unreadable label: the readers skip the sample as missing_label


def _info_lengths(shards: list[str]) -> dict[str, int]:
    """Shard name -> sample count from an `_info.json` beside local shards (timm's wds layout), if any."""
    if not shards or not is_local(shards[0]):
        return {}
    path = Path(shards[0]).parent / "_info.json"
    if not path.exists():
        return {}
    out = {}
    for split in json.loads(path.read_text()).get("splits", {}).values():
        if isinstance(split, dict):
            out.update(zip(split.get("filenames", []), split.get("shard_lengths", []), strict=False))
    return out


def _split_member_name(name: str) -> tuple[str, str]:
    base = os.path.basename(name)
    stem, _, ext = base.partition(".")
    return os.path.join(os.path.dirname(name), stem), ext.lower()


def read_shard(url: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Raw samples (key, {extension: bytes}) of one shard, members grouped by key as webdataset groups them.

    Opens anything webdataset's `gopen` opens (local paths, `pipe:`, URLs). A sample is yielded only once the
    next one starts, so the sample that a truncation cuts is never yielded.

    Raises:
        BadSample('truncated_tar'): the tar ends early or its headers are corrupt.
    """
    current, parts = None, {}
    try:
        with wds.gopen(url) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = _split_member_name(member.name)
                if key != current:
                    if current is not None:
                        yield current, parts
                    current, parts = key, {}
                parts[ext] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as err:
        raise BadSample("truncated_tar", f"corrupt or truncated shard {url}: {err}") from None
    if current is not None:
        yield current, parts


def image_and_label(key: str, parts: dict[str, bytes]) -> tuple[bytes, Label]:
    """The encoded image and label (`parse_labels`: an int, or a list of classes) of a raw sample, checked before
    any decoding.

    Raises:
        BadSample: a zero-byte member, no image, no label (neither a `.cls` nor a `.json` `labels` list), or a
            `.json` `sha256` that the image bytes do not match (how a flipped byte that the JPEG decoder would accept
            is caught).
    """
    if any(len(v) == 0 for v in parts.values()):
        empty = next(ext for ext, v in parts.items() if len(v) == 0)
        raise BadSample("empty_member", f"sample '{key}' has a zero-byte .{empty}")
    ext = next((e for e in IMAGE_EXTS if e in parts), None)
    if ext is None:
        raise BadSample("missing_image", f"sample '{key}' has no image ({', '.join(IMAGE_EXTS)})")
    label = parse_labels(parts.get("cls"), parts.get("json"))
    if label is None:
        raise BadSample("missing_label", f"sample '{key}' has a .cls or .json labels that are not class numbers")
    if label == -1:
        raise BadSample("missing_label", f"sample '{key}' has no .cls label (nor a .json labels list)")
    if "json" in parts:
        try:
            digest = json.loads(parts["json"]).get("sha256")
        except (ValueError, AttributeError):
            digest = None
        if digest and hashlib.sha256(parts[ext]).hexdigest() != digest:
            raise BadSample("checksum_mismatch", f"sample '{key}': image bytes do not match their sha256")
    return parts[ext], label


def read_span(file, key: str, label: Label, span: np.ndarray) -> tuple[bytes, Label]:
    """A sample's image bytes and label (the index's: the `.json`'s labels, read again, add nothing), read by
    offset from an open local shard (see `ShardIndex.spans`), and checked by `image_and_label` as a streamed sample
    is."""
    offset, size, json_offset, json_size = (int(v) for v in span)
    classes = label if isinstance(label, list) else [label] if label >= 0 else []
    parts = {"cls": " ".join(map(str, classes)).encode()} if classes else {}
    if offset >= 0:
        parts["jpg"] = _read_at(file, key, offset, size)
    if json_offset >= 0:
        parts["json"] = _read_at(file, key, json_offset, json_size)
    return image_and_label(key, parts)


def _read_at(file, key: str, offset: int, size: int) -> bytes:
    file.seek(offset)
    raw = file.read(size)
    if len(raw) < size:
        raise BadSample("truncated_tar", f"sample '{key}': the shard ends inside it")
    return raw


class BadCounts(Counter):
    """Unreadable samples per cause; `check` fails once they exceed a fraction of the samples expected."""

    def check(self, expected: int, max_fraction: float, where: str) -> None:
        bad = sum(self.values())
        if bad > max_fraction * expected:
            causes = ", ".join(f"{cause} {n}" for cause, n in sorted(self.items()) if n)
            raise DataError(f"{where}: {bad:,} of {expected:,} samples unreadable ({100 * bad / expected:.2f}%: "
                            f"{causes}), above the limit max_bad_fraction={max_fraction:g}; fix or re-write the "
                            f"shards, or raise data.loader.max_bad_fraction")


def iter_encoded(shards: list[str], keys: set[str] | None = None, bad: BadCounts | None = None
                 ) -> Iterator[tuple[str, bytes, Label]]:
    """Encoded (key, image bytes, label) for each sample (optionally only those in `keys`), checked by
    `image_and_label`; the one shard read loop of evaluation (training reads by offset, see `stream`).

    Unreadable samples are counted per cause in `bad` and skipped (samples lost to a truncated tar are not
    counted here: the caller knows how many it expected); without `bad` the first one raises DataError.
    """
    for shard in shards:
        try:
            for key, parts in read_shard(shard):
                if keys is not None and key not in keys:
                    continue
                try:
                    yield (key, *image_and_label(key, parts))
                except BadSample as err:
                    if bad is None:
                        raise DataError(f"{err} (in {shard})") from None
                    bad[err.cause] += 1
        except BadSample as err:  # the rest of this shard is lost: the caller counts it as expected but not read
            if bad is None:
                raise DataError(str(err)) from None


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


def folder_to_shards(root: str, out: Path, split: str = "train", shard_size: int = 1000, seed: int = 0,
                     progress: bool = True, workers: int | None = None) -> dict:
    """Write an ImageNet-style folder as webdataset shards `<split>-NNNNNN.tar` (in parallel, `workers` processes;
    default: one per core), plus `classes.json` (label -> class name) and `_info.json` (split sizes and shard
    lengths, the layout timm's wds reader reads).

    Image bytes are copied verbatim (no re-encoding, so pixels are identical); samples are shuffled with `seed`
    so that shard prefixes are class-mixed; each sample carries a `.json` with its source path, class and the
    image's sha256 (img2dataset's field), which the readers check.
    """
    files = folder_files(root)
    if not files:
        raise DataError(f"no images found under {root} (expected {root}/<class>/<image>)")
    classes = folder_classes(root)
    labels = {name: i for i, name in enumerate(classes)}
    order = np.random.default_rng(seed).permutation(len(files))
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(root, out / f"{split}-{start // shard_size:06d}.tar",
             [(int(i), *files[i], labels[files[i][0].split("/", 1)[0]]) for i in order[start:start + shard_size]])
            for start in range(0, len(files), shard_size)]
    workers = min(len(jobs), workers or os.cpu_count() or 1)
    bar = tqdm(total=len(files), desc=f"{root} -> shards", unit="img", disable=not progress, mininterval=2)
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for written in pool.map(_write_folder_shard, jobs):
                bar.update(written)
    else:
        for job in jobs:
            bar.update(_write_folder_shard(job))
    bar.close()
    (out / "classes.json").write_text(json.dumps(classes, indent=0))
    info_path = out / "_info.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {"name": Path(root).name, "splits": {}}
    info["num_classes"] = len(classes)
    info["splits"][split] = {"num_samples": len(files), "filenames": [path.name for _, path, _ in jobs],
                             "shard_lengths": [len(samples) for _, _, samples in jobs], "shuffle_seed": seed}
    info_path.write_text(json.dumps(info, indent=1))
    return info


def _write_folder_shard(job: tuple) -> int:
    """One shard of `folder_to_shards` (atomic: temp file + rename), with its sidecar index."""
    root, path, samples = job
    tmp = path.parent / f".{path.name}.tmp{os.getpid()}"
    with wds.TarWriter(str(tmp)) as sink:
        for i, key, file, label in samples:
            ext = file.rpartition(".")[2].lower()
            with open(file, "rb") as f:
                data = f.read()
            sink.write({"__key__": f"{i:09d}", "jpg" if ext == "jpeg" else ext: data, "cls": str(label).encode(),
                        "json": json.dumps({"path": os.path.relpath(file, root), "class": key.split("/", 1)[0],
                                            "sha256": hashlib.sha256(data).hexdigest()}).encode()})
    os.replace(tmp, path)
    write_sidecar(path)
    return len(samples)


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

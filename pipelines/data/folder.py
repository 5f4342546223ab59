"""ImageNet-style class folders (`root/<class>/<image>`) converted to webdataset shards, so a folder source is read
by the same reader, index and image path as every other source."""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipelines import atomic
from pipelines.config import UserError, count
from pipelines.data.labels import Label
from pipelines.data.reader import IMAGE_EXTS, DataError
from pipelines.data.sources import write_info
from pipelines.data.writer import write_samples


def folder_classes(root: str) -> list[str]:
    """Class names of an ImageNet-style folder (`root/<class>/<image>`), sorted: label i is the i-th name."""
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


def is_image(entry: os.DirEntry) -> bool:
    """A file of a class folder that is taken as an image (by its extension)."""
    return entry.is_file() and entry.name.rpartition(".")[2].lower() in IMAGE_EXTS


def folder_files(root: str) -> list[tuple[str, str]]:
    """(key, path) of every image under `root/<class>/`, key = '<class>/<file stem>', in sorted order."""
    out = []
    for name in folder_classes(root):
        for entry in sorted(os.scandir(os.path.join(root, name)), key=lambda e: e.name):
            if is_image(entry):
                out.append((f"{name}/{entry.name.rpartition('.')[0]}", entry.path))
    return out


def folder_to_shards(root: str, out: Path, split: str = "train", shard_size: int = 1000, seed: int = 0,
                     progress: bool = True, workers: int | None = None) -> dict:
    """Write an ImageNet-style folder as webdataset shards `<split>-NNNNNN.tar` (in parallel, `workers` processes;
    default: one per core), plus `classes.json` (label -> class name) and `_info.json` (`sources.write_info`).

    Image bytes are copied verbatim (no re-encoding, so pixels are identical); samples are shuffled with `seed`
    so that shard prefixes are class-mixed; each sample carries a `.json` with its source path, class and the
    image's sha256 (img2dataset's field), which the readers check.
    """
    files = folder_files(root)
    if not files:
        raise DataError(f"no images found under {root} (expected {root}/<class>/<image>)")
    classes = folder_classes(root)
    _check_out(out, split, classes)
    labels = {name: i for i, name in enumerate(classes)}
    order = np.random.default_rng(seed).permutation(len(files))
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(root, out / f"{split}-{start // shard_size:06d}.tar",
             [(int(i), *files[i], labels[files[i][0].split("/", 1)[0]]) for i in order[start:start + shard_size]])
            for start in range(0, len(files), shard_size)]
    workers = min(len(jobs), workers or os.cpu_count() or 1)
    bar = tqdm(total=len(files), desc=f"{root} -> shards", unit="img", disable=not progress, mininterval=2)
    broken: list[tuple[str, str, str]] = []
    with ProcessPoolExecutor(max_workers=workers) if workers > 1 else _InProcess() as pool:
        for written, suspects in pool.map(_write_folder_shard, jobs):
            bar.update(written)
            broken += suspects
    bar.close()
    if broken:  # written all the same: the readers count them unreadable, up to data.loader.max_bad_fraction
        (out / BROKEN).write_text(json.dumps(sorted(broken), indent=0))
        (out / ORIGIN).write_text(json.dumps({"root": os.path.abspath(root)}))
        warn_broken(root, out, len(files))
    (out / "classes.json").write_text(json.dumps(classes, indent=0))
    return write_info(out, split, [path.name for _, path, _ in jobs], [len(samples) for _, _, samples in jobs],
                      name=Path(root).name, num_classes=len(classes))


def _check_out(out: Path, split: str, classes: list[str]) -> None:
    """`out` may hold other splits of the same classes (a train and a test folder converted in turn), not shards of
    this split already (they would mix with these, and a brace range would read both), nor another class list
    (label i would mean another class in each split)."""
    if not out.is_dir():
        return
    if held := sorted(out.glob(f"{split}-*.tar")):
        raise DataError(f"--out {out} already holds {len(held)} {split} shard{'s' * (len(held) > 1)} ({held[0].name}"
                        f"{', ...' if len(held) > 1 else ''}); give an empty folder, or remove them first")
    named = out / "classes.json"
    if named.is_file():
        try:
            theirs = json.loads(named.read_text())
        except (OSError, ValueError):
            theirs = None
        if theirs != classes:
            shown = ", ".join(map(str, theirs[:5])) if isinstance(theirs, list) else "unreadable"
            raise DataError(f"--out {out} holds the splits of other class folders (classes.json: {shown}), not these "
                            f"({', '.join(classes[:5])}): label i would name another class in each split; give the "
                            f"same class folders, or another --out")


class _InProcess:
    """`ProcessPoolExecutor`'s `map` in this process (one worker)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    map = staticmethod(map)


_SIGNATURES = {"jpg": (b"\xff\xd8\xff", b"\xff\xd9", "JPEG"), "png": (b"\x89PNG\r\n\x1a\n", b"IEND\xaeB`\x82", "PNG"),
               "webp": (b"RIFF", None, "WEBP")}


def broken_image(data: bytes, ext: str) -> str | None:
    """Why a file's bytes are not a whole image of its extension's format, from its first and last bytes alone (no
    decoding): empty, another format, or cut before its end marker (JPEG's EOI, PNG's IEND; JPEG allows trailing
    bytes after EOI, so its last 4 KiB are searched, and a file without the marker there is decoded before it is
    called cut). None: it looks whole (it may still not decode)."""
    if not data:
        return "zero bytes"
    start, end, name = _SIGNATURES["jpg" if ext == "jpeg" else ext]
    if not data.startswith(start) or (name == "WEBP" and data[8:12] != b"WEBP"):
        return f"not {name} data (starts {data[:8].hex(' ')})"
    if end is not None and end not in data[-4096:] and not _decodes(data):  # (trailing bytes: some cameras')
        return f"a {name} cut short (no end marker)"
    return None


def _decodes(data: bytes) -> bool:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
        return True
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return False


BROKEN = "broken.json"  # beside the converted shards: [path, sample key, why] of each file that is no whole image


ORIGIN = "origin.json"  # beside BROKEN: {"root": the folder converted}, for `origin` to give a full path


@functools.lru_cache(maxsize=64)
def _flagged(folder: str) -> dict[str, str]:
    """{sample key: the file it came from} of the files a conversion into `folder` flagged (`BROKEN`); {} where
    none was, or the folder is not a conversion."""
    try:
        broken = json.loads((Path(folder) / BROKEN).read_text())
    except (OSError, ValueError):
        return {}
    try:
        root = json.loads((Path(folder) / ORIGIN).read_text())["root"]
    except (OSError, ValueError, KeyError):
        root = ""  # converted by a release that did not write it: the path below the folder source's root
    return {key: os.path.join(root, path) for path, key, _ in broken}


def origin(shard: str, key: str) -> str | None:
    """The image file a converted folder's sample `key` in `shard` was copied from, where the conversion flagged it
    (`warn_broken`): what an error about that sample names, rather than the cache's shard alone."""
    return _flagged(os.path.dirname(shard)).get(key)


def warn_broken(root: str, shards: Path, total: int) -> None:
    """Name the files of `root` converted into `shards` that do not look like whole images, and the sample keys a
    reader's errors will name them by (on every run that uses the converted folder, not only the first)."""
    if not (shards / BROKEN).exists():
        return
    broken = json.loads((shards / BROKEN).read_text())
    path, key, why = broken[0]
    print(f"warning: {len(broken):,} of {total:,} files under {root} do not look like whole images (first: {path}, "
          f"sample '{key}' of its shards: {why}); they are kept, and a run skips them as unreadable up "
          f"to data.loader.max_bad_fraction: fix or remove them", file=sys.stderr)


def _folder_sample(root: str, i: int, key: str, file: str, label: Label, suspects: list) -> dict:
    ext = file.rpartition(".")[2].lower()
    with open(file, "rb") as f:
        data = f.read()
    if (why := broken_image(data, ext)) is not None:
        suspects.append((os.path.relpath(file, root), f"{i:09d}", why))
    return {"__key__": f"{i:09d}", "jpg" if ext == "jpeg" else ext: data, "cls": str(label).encode(),
            "json": json.dumps({"path": os.path.relpath(file, root), "class": key.split("/", 1)[0],
                                "sha256": hashlib.sha256(data).hexdigest()}).encode()}


def _write_folder_shard(job: tuple) -> tuple[int, list[tuple[str, str, str]]]:
    """One shard of `folder_to_shards`, with its sidecar index: the samples written, and (path, sample key, why) of
    each file that does not look like a whole image (`broken_image`)."""
    root, path, samples = job
    suspects: list[tuple[str, str, str]] = []
    return write_samples(path, (_folder_sample(root, *sample, suspects) for sample in samples)), suspects


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (a shard size of 0 or less would write no shard and say it had)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def split_name(text: str) -> str:
    """An argparse type: a split's name, the prefix of its shards' file names in --out."""
    if not text or "/" in text or text.startswith("."):
        raise argparse.ArgumentTypeError(f"{text!r} is not a file name prefix (no '/', not starting with '.')")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.data.folder",
                                     description="Convert an ImageNet-style folder (root/<class>/<image>) to shards.")
    parser.add_argument("--from-folder", required=True, help="folder of class folders")
    parser.add_argument("--out", required=True, help="output folder for the shards, classes.json and _info.json")
    parser.add_argument("--split", type=split_name, default="train",
                        help="split name: shard prefix and _info.json entry")
    parser.add_argument("--shard-size", type=positive_int, default=1000, help="samples per shard")
    args = parser.parse_args(argv)
    out = Path(args.out)
    try:
        if not os.path.isdir(args.from_folder):
            raise DataError(f"data path not found: {args.from_folder} (expected a folder of class folders)")
        if (problem := atomic.folder_problem(out)) is not None:
            raise UserError(f"--out {out} {problem}; the shards are written into a folder (new or existing)")
        info = folder_to_shards(args.from_folder, out, args.split, args.shard_size)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    split = info["splits"][args.split]
    print(f"{count(split['num_samples'], 'sample')} of {count(info['num_classes'], 'class', 'classes')}"
          f" in {count(len(split['filenames']), 'shard')}: "
          f"{args.out}/{args.split}-{{000000..{len(split['filenames']) - 1:06d}}}.tar")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

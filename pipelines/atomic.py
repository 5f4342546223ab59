"""Files and folders that appear whole or not at all: written under a temporary name beside the target, then
renamed into place (a rename within one file system is atomic), so a reader, a concurrent writer or a process
killed midway never leaves or sees half of one."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def file_in_the_way(folder: Path) -> Path | None:
    """The file that keeps `folder` from being a folder (it, or a parent of it, is a file); None where it is one or
    can be made one. Said before any work: `mkdir` would fail there only once the work is done."""
    there = next(p for p in (Path(folder), *Path(folder).parents) if p.exists())  # `exists` is False below a file
    return None if there.is_dir() else there


def temp_name(target: Path) -> Path:
    """A unique hidden name beside `target` (`.<name>.tmp-<pid>-<random>`): never one another writer uses."""
    target = Path(target)
    return target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def write_bytes(path: Path, data: bytes) -> None:
    """Write `path` whole: a temporary file, then a rename over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def folder(target: Path) -> Iterator[Path]:
    """A temporary folder to fill, moved to `target` when the block ends without an error.

    Where `target` already exists (a concurrent writer of the same content finished first), theirs is kept and
    ours removed; on an error ours is removed and `target` left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(target)
    tmp.mkdir()
    try:
        yield tmp
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

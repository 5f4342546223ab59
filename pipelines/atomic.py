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


def folder_problem(folder: Path, write: bool = True) -> str | None:
    """Why `folder` cannot be used as a folder to write into (`write`; else to read from or make), as words to
    follow its name: it or a parent of it is a file, a parent cannot be looked into, or the folder (or the nearest
    one that exists) cannot be written. None where it can. Said before any work: `mkdir` or a write would fail only
    once the work is done."""
    try:
        there = next(p for p in (Path(folder), *Path(folder).parents) if p.exists())  # False below a file, too
    except OSError as err:  # `exists` raises for a folder it may not look into
        return f"cannot be looked into: {err.filename or folder} ({err.strerror or err})"
    if not there.is_dir():
        return "is a file" if there == Path(folder) else f"is below {there}, a file"
    if write and not os.access(there, os.W_OK | os.X_OK):
        why = "a read-only file system" if os.statvfs(there).f_flag & os.ST_RDONLY else "no permission"
        return f"cannot be written ({why})" if there == Path(folder) else \
            f"cannot be made: {there} cannot be written ({why})"
    return None


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

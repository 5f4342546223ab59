"""Reading webdataset tar shards: tar headers (parsed here, so a sample is read by one offset and size), samples read
by byte span (`ShardFiles`: local files, and object storage for evaluation), whole shards streamed (`read_shard`,
for what can only be streamed), the checks every sample passes (`image_and_label`), and the counts of what could
not be read."""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import webdataset as wds

from pipelines.config import UserError
from pipelines.data.labels import Label, parse_labels

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
BLOCK = tarfile.BLOCKSIZE
_ZERO = bytes(BLOCK)
_FILE_TYPES = (b"0", b"\0", b"7")  # regular files (and contiguous ones): what webdataset and tar write


class DataError(UserError):
    """Data that cannot be read: a missing path, a corrupt shard, a sample without its label."""


OBJECT_STORES = ("s3://", "gs://")  # read through pyarrow.fs, as the study's `--storage` is


def open_url(url: str):
    """A binary stream of a shard or its sidecar. Object storage (`s3://bucket/key.tar`, `gs://...`) is read through
    `pyarrow.fs`, with credentials from the standard environment variables and the URI options `--storage` takes
    (`?endpoint_override=host:port&scheme=http` for a server other than AWS's); anything else through webdataset's
    `gopen` (local paths, `pipe:` commands, http(s) URLs). Read from start to end: `ShardFiles` reads spans."""
    if url.startswith(OBJECT_STORES):
        fs, path = _object_store(url)
        return fs.open_input_stream(path)
    return wds.gopen(url)


def _object_store(url: str):
    """(pyarrow FileSystem, path) of an object-storage URL (`OBJECT_STORES`)."""
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(url)


BAD_CAUSES = ("truncated_tar", "empty_member", "missing_label", "missing_image", "undecodable_image",
              "checksum_mismatch")


class BadSample(Exception):
    """One unreadable sample; `cause` is one of BAD_CAUSES. Counted and skipped by the readers."""

    def __init__(self, cause: str, message: str):
        super().__init__(message)
        self.cause = cause


class BadCounts(Counter):
    """Unreadable samples per cause, and the first of each (`first`: cause -> which sample, in which shard, and why),
    so the error that ends a run can name a file to look at. `check` fails once they exceed a fraction of the samples
    expected. Pickles with its examples (DataLoader workers send theirs), and `update` from another BadCounts keeps
    the earliest example of each cause."""

    def __init__(self, *args, **kwargs):
        self.first: dict[str, str] = {}
        super().__init__(*args, **kwargs)  # `update`: a BadCounts given brings its examples

    def add(self, cause: str, example: str) -> None:
        """One unreadable sample of `cause`; `example` says which (kept if it is the first of its cause)."""
        self[cause] += 1
        self.first.setdefault(cause, example)

    def update(self, other=None, /, **kwargs):
        super().update(other, **kwargs)
        for cause, example in getattr(other, "first", {}).items():
            self.first.setdefault(cause, example)

    def clear(self):
        super().clear()
        self.first.clear()

    def parts(self) -> tuple[dict[str, int], dict[str, str]]:
        """Plain dicts, for a DataLoader item: its collation copies a Mapping and then `update`s it, which for a
        Counter adds the counts a second time."""
        return dict(self), dict(self.first)

    @classmethod
    def of(cls, counts: dict[str, int], first: dict[str, str]) -> BadCounts:
        """The BadCounts `parts` gave."""
        bad = cls(counts)
        bad.first.update(first)
        return bad

    def __reduce__(self):
        return BadCounts.of, self.parts()

    def check(self, expected: int, max_fraction: float, where: str) -> None:
        bad = sum(self.values())
        if bad > max_fraction * expected:
            causes = ", ".join(f"{cause} {n}" for cause, n in sorted(self.items()) if n)
            first = "; ".join(f"first {cause}: {self.first[cause]}" for cause, n in sorted(self.items())
                              if n and cause in self.first)
            raise DataError(f"{where}: {bad:,} of {expected:,} samples unreadable ({100 * bad / expected:.2f}%: "
                            f"{causes}), above the limit max_bad_fraction={max_fraction:g}"
                            + (f" ({first})" if first else "")
                            + "; fix or re-write the shards, or raise data.loader.max_bad_fraction")


def undecodable(key: str, err: Exception, shard: str | None = None) -> str:
    """`BadCounts`' example of an image that would not decode: which sample, where (for a folder source, the image
    file it came from, where its conversion flagged it), and what the decoder said (a zero-byte or cut file, a
    format PIL does not read, a decompression bomb)."""
    from pipelines.data.folder import origin
    from pipelines.data.sources import is_local

    source = origin(shard, key) if shard and is_local(shard) else None
    return (f"sample '{key}'" + (f" in {shard}" if shard else "") + (f" (the file {source})" if source else "")
            + f": {type(err).__name__}: {err}")


def split_member_name(name: str) -> tuple[str, str]:
    """A member name's sample key and extension, as webdataset splits them (`dir/0001.seg.png` -> `dir/0001`,
    `seg.png`)."""
    base = os.path.basename(name)
    stem, _, ext = base.partition(".")
    return os.path.join(os.path.dirname(name), stem), ext.lower()


class TarFormatError(Exception):
    """A header that is not a tar header (a corrupt or cut shard)."""


@dataclass
class Header:
    """One tar header block: the member's name (bytes, before extended headers apply), data size and type."""

    name: bytes
    size: int
    kind: bytes


def parse_header(block: bytes) -> Header | None:
    """A tar header block (POSIX ustar, GNU or pax layout); None for the zero block that ends a tar.

    Raises:
        TarFormatError: a short block or a checksum that does not match.
    """
    if len(block) < BLOCK:
        raise TarFormatError("the tar ends inside a header")
    if block == _ZERO:
        return None
    try:
        stored = int(block[148:156].strip(b"\0 ") or b"0", 8)
    except ValueError:
        raise TarFormatError("a header with an unreadable checksum") from None
    if stored != sum(block[:148]) + 256 + sum(block[156:]):
        raise TarFormatError("a header whose checksum does not match")
    name = block[:100].split(b"\0", 1)[0]
    if block[257:263] == b"ustar\0" and (prefix := block[345:500].split(b"\0", 1)[0]):
        name = prefix + b"/" + name
    raw = block[124:136]
    size = int.from_bytes(raw[1:], "big") if raw[0] & 0x80 else int(raw.strip(b"\0 ") or b"0", 8)
    return Header(name, size, block[156:157])


def padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def pax_path(data: bytes) -> bytes | None:
    """The `path` record of a pax extended header, if it has one."""
    while data:
        length, _, rest = data.partition(b" ")
        if not length.isdigit():
            return None
        record, data = rest[:int(length) - len(length) - 1], data[int(length):]
        key, _, value = record.partition(b"=")
        if key == b"path":
            return value.rstrip(b"\n")
    return None


@dataclass
class Member:
    """A file member: its name, where its data starts and its size, and where its first header starts (before any
    pax or GNU long-name header that names it)."""

    name: str
    start: int
    data: int
    size: int


def iter_members(read_at, end: int, ended: list | None = None) -> Iterator[Member]:
    """The file members of a plain tar, in order, read through `read_at(offset, size) -> bytes` (a local file's
    pread, or a slice of a buffer holding one sample's members); stops at the end blocks or at `end`. `ended`, if
    given, gets True appended where the tar's end blocks were found (a tar without them was cut between members).

    Raises:
        TarFormatError: a corrupt header, or a member whose data runs past `end`.
    """
    pos, start, long_name = 0, None, None
    while pos + BLOCK <= end:
        header = parse_header(read_at(pos, BLOCK))
        if header is None:
            if ended is not None and pos + 2 * BLOCK <= end:
                ended.append(True)
            return
        data = pos + BLOCK
        if data + header.size > end:
            raise TarFormatError("a member runs past the end of the tar")
        start = pos if start is None else start
        pos = data + padded(header.size)
        if header.kind in (b"L", b"x"):  # GNU long name, pax extended header: they name the next member
            extra = read_at(data, header.size)
            long_name = extra.rstrip(b"\0") if header.kind == b"L" else pax_path(extra) or long_name
            continue
        if header.kind in _FILE_TYPES:
            yield Member((long_name or header.name).decode("utf-8", "replace"), start, data, header.size)
        start, long_name = None, None
    if pos < end:
        raise TarFormatError("the tar ends inside a header")


def sample_parts(buf: bytes) -> tuple[str, dict[str, bytes]]:
    """(key, {extension: bytes}) of one sample read whole by its offset and size (its members' headers and data).

    Raises:
        BadSample('truncated_tar'): the bytes are not the sample's tar members (the shard changed or was cut).
    """
    view = memoryview(buf)
    key, parts = None, {}
    try:
        for m in iter_members(lambda at, n: bytes(view[at:at + n]), len(buf)):
            key, ext = split_member_name(m.name)
            parts[ext] = bytes(view[m.data:m.data + m.size])
    except TarFormatError as err:
        raise BadSample("truncated_tar", f"a sample's bytes are not tar members ({err}): the shard changed or "
                                         f"was cut after it was indexed") from None
    if key is None:
        raise BadSample("truncated_tar", "a sample's bytes hold no tar member: the shard changed after indexing")
    return key, parts


class ShardFiles:
    """Shards read by byte span, at most `limit` open at a time (least recently used closed first): local files
    (`pread`), and plain tars in object storage (`s3://`, `gs://`: one ranged GET per read through `pyarrow.fs`).

    Object storage is read this way by evaluation only, which wants a few samples of many shards (so it reads the
    bytes it evaluates, no more); pretraining streams those shards whole (`stream.ShardStream`), since it reads
    every sample and a sequential read beats a request per sample.

    An OS or storage error (a missing file or object, permissions, too many open files) is a DataError naming the
    shard and the error: it is not a corrupt sample, and no sample is counted bad for it.
    """

    def __init__(self, limit: int = 64):
        self.limit = limit
        self.open: OrderedDict[str, object] = OrderedDict()  # url -> a local fd, or a pyarrow RandomAccessFile

    def read(self, path: str, offset: int, size: int) -> bytes:
        try:
            handle = self.open.pop(path, None)
            if handle is None:
                while len(self.open) >= self.limit:
                    _close(self.open.popitem(last=False)[1])
                handle = _open_ranged(path) if path.startswith(OBJECT_STORES) else os.open(path, os.O_RDONLY)
            self.open[path] = handle
            return os.pread(handle, size, offset) if isinstance(handle, int) else handle.read_at(size, offset)
        except OSError as err:  # pyarrow's storage errors are OSErrors too
            code = f" (errno {err.errno})" if err.errno else ""
            raise DataError(f"cannot read shard {path}: {err.strerror or err}{code}; this is the file system or "
                            f"the storage, not the data") from None

    def close(self) -> None:
        for handle in self.open.values():
            _close(handle)
        self.open.clear()

    def __del__(self):
        self.close()


def _open_ranged(url: str):
    fs, path = _object_store(url)
    return fs.open_input_file(path)


def _close(handle) -> None:
    if isinstance(handle, int):
        os.close(handle)
    else:
        handle.close()


def read_sample(files: ShardFiles, path: str, offset: int, size: int) -> tuple[str, bytes, Label]:
    """(key, image bytes, label) of the sample at `offset` (its first header) spanning `size` bytes of a shard that
    `files` reads, checked by `image_and_label` as a streamed sample is."""
    return _checked(files.read(path, offset, size), path, offset, size)


def read_samples(files: ShardFiles, path: str, offsets: np.ndarray, sizes: np.ndarray, bad: BadCounts
                 ) -> Iterator[tuple[str, bytes, Label]]:
    """`read_sample` for several samples of one shard, in order: each run of adjacent spans (consecutive samples
    of the tar) is read in one request, and split. Unreadable samples are counted per cause in `bad` and skipped."""
    offsets, sizes = np.asarray(offsets, dtype=np.int64), np.asarray(sizes, dtype=np.int64)
    runs = np.split(np.arange(len(offsets)), np.flatnonzero(offsets[1:] != offsets[:-1] + sizes[:-1]) + 1)
    for run in runs:
        if len(run) == 0:
            continue
        start = int(offsets[run[0]])
        buf = memoryview(files.read(path, start, int(offsets[run[-1]] + sizes[run[-1]]) - start))
        for i in run:
            at, size = int(offsets[i]), int(sizes[i])
            try:
                yield _checked(buf[at - start:at - start + size], path, at, size)
            except BadSample as err:
                bad.add(err.cause, f"{err} (in {path} at byte {at})")


def _checked(buf: bytes | memoryview, path: str, offset: int, size: int) -> tuple[str, bytes, Label]:
    if len(buf) < size:
        raise BadSample("truncated_tar", f"the shard ends inside the sample at byte {offset}")
    key, parts = sample_parts(buf)
    return (key, *image_and_label(key, parts))


def read_shard(url: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Raw samples (key, {extension: bytes}) of one shard, members grouped by key as webdataset groups them.

    Opens what `open_url` opens (local paths, `pipe:`, http(s) and object-storage URLs). A sample is yielded only
    once the next one starts, so the sample that a truncation cuts is never yielded.

    Raises:
        BadSample('truncated_tar'): the tar ends early or its headers are corrupt.
    """
    current, parts = None, {}
    try:
        with open_url(url) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = split_member_name(member.name)
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


def iter_encoded(shards: list[str], bad: BadCounts | None = None, want: Callable[[str], bool] | None = None
                 ) -> Iterator[tuple[str, bytes, Label]]:
    """Encoded (key, image bytes, label) of each sample of streamed shards (optionally only those `want(key)`),
    checked by `image_and_label`: how shards are read that cannot be read by offset (`pipe:`, http(s)), or that
    pretraining streams (object storage).

    Unreadable samples are counted per cause in `bad` and skipped (samples lost to a truncated tar are not
    counted here: the caller knows how many it expected); without `bad` the first one raises DataError.
    """
    for shard in shards:
        try:
            for key, parts in read_shard(shard):
                if want is not None and not want(key):
                    continue
                try:
                    yield (key, *image_and_label(key, parts))
                except BadSample as err:
                    if bad is None:
                        raise DataError(f"{err} (in {shard})") from None
                    bad.add(err.cause, f"{err} (in {shard})")
        except BadSample as err:  # the rest of this shard is lost: the caller counts it as expected but not read
            if bad is None:
                raise DataError(str(err)) from None
            bad.first.setdefault(err.cause, str(err))

"""Where a source's shards are, and what identifies their content: URL expansion, local checks, `_info.json`
(timm's wds layout, the one this project writes), the per-shard sidecar index, and shard identities."""

from __future__ import annotations

import hashlib
import json
import os
import urllib.request
from pathlib import Path

import braceexpand

from pipelines.data.reader import DataError, open_url

SIDECAR = ".idx.json"  # `<shard>.tar.idx.json`: one shard's index (keys, labels, byte spans) beside it
SIDECAR_VERSION = 3  # the version of `pipelines.data.index` whose rows it holds


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
    """Expanded shard list; local paths must exist (remote ones, `reader.open_url`'s, are checked when read)."""
    shards = expand_urls(urls)
    missing = [u for u in shards if is_local(u) and not os.path.exists(u)]
    if missing:
        raise DataError(f"data path not found: {missing[0]} ({len(missing)} of {len(shards)} shards missing)")
    if (folder := folder_given(shards)) is not None:
        raise DataError(folder)
    return shards


def folder_given(shards: list[str]) -> str | None:
    """What is wrong where a local shard path is a folder (the folder of the shards given for them), or None."""
    folder = next((u for u in shards if is_local(u) and os.path.isdir(u)), None)
    return None if folder is None else (f"{folder} is a folder; give tar shards: a path, or a brace range such as "
                                        f"{os.path.join(folder, 'train-{000000..000099}.tar')}")


def info_lengths(shards: list[str]) -> dict[str, int]:
    """Shard path -> sample count, for the local shards that the `_info.json` in their own folder lists (shards
    from several folders, `a/{0..3}.tar;b/{0..3}.tar`, each by its folder's file, never by a name another folder
    also uses)."""
    out: dict[str, int] = {}
    listed: dict[str, dict[str, int]] = {}
    for url in shards:
        if not is_local(url):
            continue
        folder, name = os.path.split(url)
        if folder not in listed:
            listed[folder] = info_listing(Path(folder) / "_info.json")
        if (n := listed[folder].get(name)) is not None:
            out[url] = n
    return out


def info_files(shards: list[str]) -> list[Path]:
    """The `_info.json` path of each folder that holds local shards of `shards` (whether it exists or not), in
    order of first appearance."""
    return [Path(folder) / "_info.json" for folder in dict.fromkeys(os.path.dirname(u) for u in shards if is_local(u))]


def info_listing(path: Path) -> dict[str, int]:
    """Shard name -> sample count over every split of one `_info.json`; {} where there is none."""
    if not path.exists():
        return {}
    out = {}
    for split in json.loads(path.read_text()).get("splits", {}).values():
        if isinstance(split, dict):
            out.update(zip(split.get("filenames", []), split.get("shard_lengths", []), strict=False))
    return out


def write_info(folder: Path, split: str, filenames: list[str], lengths: list[int], **extra) -> dict:
    """Add `split` to `folder/_info.json` (timm's wds layout: per split its sample count, shard names and
    lengths), keeping other splits; `extra` (name, num_classes, ...) goes to the top level (a name already there
    stays: the second split's folder, `test`, does not rename the dataset)."""
    from pipelines import atomic

    path = folder / "_info.json"
    info = json.loads(path.read_text()) if path.exists() else {"splits": {}}
    info.update({k: v for k, v in extra.items() if k != "name" or "name" not in info})
    info["splits"][split] = {"num_samples": int(sum(lengths)), "filenames": list(filenames),
                             "shard_lengths": [int(n) for n in lengths]}
    atomic.write_bytes(path, json.dumps(info, indent=1).encode())
    return info


def split_files(folder: Path, split: str) -> list[str] | None:
    """The shard paths `_info.json` lists for `split`, or None where it has no such split."""
    path = folder / "_info.json"
    if not path.exists():
        return None
    entry = json.loads(path.read_text()).get("splits", {}).get(split)
    return [str(folder / name) for name in entry["filenames"]] if isinstance(entry, dict) else None


def sidecar_url(url: str) -> str:
    """Where a shard's sidecar index lives: its URL (or `pipe:` command) with the last `.tar` -> `.tar.idx.json`."""
    head, dot, tail = url.rpartition(".tar")
    return f"{head}{dot}{SIDECAR}{tail}" if dot else url + SIDECAR


def _probe(url: str) -> str:
    """`url` to read a sidecar that may not exist: a `pipe:` command's own stderr silenced (`cat: ...: No such file`
    twice per shard of a source without sidecars; that it has none is what the probe finds out)."""
    return f"pipe:exec 2>/dev/null; {url[len('pipe:'):]}" if url.startswith("pipe:") else url


def read_sidecar(url: str) -> dict | None:
    """A shard's sidecar index, or None where there is none or another reader version wrote it (the shard is then
    streamed to index it)."""
    try:
        with open_url(_probe(sidecar_url(url))) as f:
            side = json.loads(f.read())
    except (OSError, ValueError):
        return None
    fields = {"keys", "labels", "offsets", "sizes"}
    return side if isinstance(side, dict) and fields <= set(side) and side.get("version") == SIDECAR_VERSION else None


def shard_identity(url: str) -> list:
    """What identifies a shard's content, for the key of its index (a changed shard gets a new key).

    A local file: its path, size and modification time. An http(s) shard: its ETag (else Last-Modified and
    Content-Length), from a HEAD request. Any other remote shard (`s3://`, `gs://`, `pipe:` commands): the content
    hash of its sidecar index, which the shard writers rewrite with the shard. A remote shard with none
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
        with open_url(_probe(sidecar_url(url))) as f:
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

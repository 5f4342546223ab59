"""Cheap checks of a source before anything runs: no image decoded, no tar read. Local paths exist, class folders
match `num_classes`, image counts (files per class folder) and `_info.json` sample counts hold what the config
declares and asks, and local plain tars end as a tar ends (not cut short). What only reading can tell (remote URLs,
`pipe:` commands, shards without `_info.json`, what a cut tar lost) is listed; `prepare` checks it when it indexes
the shards."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.data.folder import folder_classes, is_image
from pipelines.data.reader import BLOCK
from pipelines.data.sources import expand_urls, folder_given, info_files, info_lengths, info_listing, is_local


@dataclass
class Findings:
    """What a preflight found: `problems` (each one line, `key.path: what is wrong; what would be valid`),
    `unchecked` (each one line, `key.path: why it could not be checked here`) and `noted` (each one line: a defect
    seen whose cost, samples lost against `data.loader.max_bad_fraction`, the real run counts when it indexes)."""

    problems: list[str] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)
    noted: list[str] = field(default_factory=list)  # seen, but what it costs only indexing tells (a cut tar)

    def __iadd__(self, other: Findings) -> Findings:
        self.problems += other.problems
        self.unchecked += other.unchecked
        self.noted += other.noted
        return self


def inspect(src, key: str, asked: list[tuple[str, int]] = ()) -> Findings:
    """Check one source's local paths and declared counts without reading any image.

    Args:
        src: a `SourceConfig`.
        key: its key path in the config (`data.pretrain`, `downstream[0]`), used in every line.
        asked: further (key path, number of examples) its train split must hold, e.g. each of `data.subsets`.

    Returns:
        The problems and what could not be checked.
    """
    found = Findings()
    needs = [(f"{key}.size", src.size), *asked]
    test_needs = [(f"{key}.test_size", src.test_size)] if src.test_size else []
    if src.source == "folder":
        _folder(src, key, needs, test_needs, found)
    elif src.source == "webdataset":
        _shards(src.urls, f"{key}.urls", needs, found, classes=(f"{key}.num_classes", src.num_classes))
        if src.test_urls:
            _shards(src.test_urls, f"{key}.test_urls", test_needs, found)
    return found


def _folder(src, key: str, needs, test_needs, found: Findings) -> None:
    train = _count_folder(src.root, f"{key}.root", found)
    if train is None:
        return
    if empty := [name for name, n in train.items() if n == 0]:  # a class no model could learn, silently at chance
        found.problems.append(f"{key}.root: {len(empty)} class folder{'s' * (len(empty) > 1)} without images "
                              f"({os.path.join(src.root, empty[0])}{', ...' if len(empty) > 1 else ''}); add their "
                              f"images, or remove them and lower {key}.num_classes")
    if len(train) != src.num_classes:
        found.problems.append(f"{key}.num_classes: {src.num_classes}, but {src.root} has {len(train)} class folders "
                              f"({_names(train)}); set {key}.num_classes: {len(train)}")
    _held(found, sum(train.values()), f"images in {src.root}", needs)
    if src.test_root:
        test = _count_folder(src.test_root, f"{key}.test_root", found)
        if test is None:
            return
        if sorted(test) != sorted(train):
            found.problems.append(f"{key}.test_root: {src.test_root} has class folders ({_names(test)}), unlike "
                                  f"{key}.root's ({_names(train)}); both need the same class folders")
        elif empty := [name for name, n in test.items() if n == 0]:  # accuracy silently over the other classes
            found.problems.append(f"{key}.test_root: {len(empty)} class folder{'s' * (len(empty) > 1)} without "
                                  f"images ({os.path.join(src.test_root, empty[0])}{', ...' if len(empty) > 1 else ''})"
                                  ": the test accuracy would leave out their classes; add their test images")
        _held(found, sum(test.values()), f"images in {src.test_root}", test_needs)


def _count_folder(root: str, key: str, found: Findings) -> dict[str, int] | None:
    """Images per class folder (the files `folder.is_image` takes), or None if absent."""
    if not os.path.isdir(root):
        what = "is a file, not a folder" if os.path.exists(root) else "not found"
        found.problems.append(f"{key}: {root} {what}; give a folder of class folders (<class>/<image>)")
        return None
    counts = {}
    for name in folder_classes(root):
        with os.scandir(os.path.join(root, name)) as entries:
            counts[name] = sum(1 for e in entries if is_image(e))
    if not counts:
        found.problems.append(f"{key}: {root} has no class folders; give a folder of class folders "
                              f"(<class>/<image>)")
        return None
    return counts


def _shards(urls: str, key: str, needs, found: Findings, classes: tuple[str, int] | None = None) -> None:
    """One split's shards: local ones exist, and hold `needs` and the declared `classes` where `_info.json` says."""
    shards = expand_urls(urls)
    local = [u for u in shards if is_local(u)]
    if (folder := folder_given(local)) is not None:
        found.problems.append(f"{key}: {folder}")
        return
    missing = [u for u in local if not os.path.exists(u)]
    if missing:
        found.problems.append(f"{key}: {missing[0]} not found ({len(missing)} of {len(shards)} shards missing); "
                              "give existing paths")
        return
    if len(local) < len(shards):
        remote = next(u for u in shards if not is_local(u))
        n = len(shards) - len(local)
        found.unchecked.append(f"{key}: {n} remote shard{'s' * (n > 1)} ({remote}): existence and sample count are "
                               "checked when they are indexed")
        return
    _cut_tars(local, key, found)
    infos = info_files(local)  # one per folder the shards are in: each lists its own shards
    if absent := [path for path in infos if not path.exists()]:
        found.unchecked.append(f"{key}: no _info.json beside {_first_in(local, absent[0])}: the sample count is "
                               "checked when the shards are indexed")
        return
    declared = {}
    for path in infos:
        try:
            declared[path] = json.loads(path.read_text()).get("num_classes")
            info_listing(path)  # its splits, as `info_lengths` reads them
        except (ValueError, AttributeError):
            found.problems.append(f"{key}: {path} is not the JSON object timm's wds layout describes; fix or "
                                  "remove it")
            return
    lengths = info_lengths(local)
    where = str(infos[0]) if len(infos) == 1 else f"the _info.json files of their {len(infos)} folders"
    if unlisted := [u for u in local if u not in lengths]:
        found.unchecked.append(f"{key}: {Path(unlisted[0]).parent / '_info.json'} does not list "
                               f"{os.path.basename(unlisted[0])}: the sample count is checked when the shards are "
                               "indexed")
    else:
        _held(found, sum(lengths.values()), f"samples {where} list{'s' * (len(infos) == 1)} for these shards", needs)
    for path, held_classes in declared.items():
        if classes and isinstance(held_classes, int) and held_classes != classes[1]:
            found.problems.append(f"{classes[0]}: {classes[1]}, but {path} says num_classes {held_classes}; "
                                  f"set {classes[0]}: {held_classes}")
            break


def _first_in(shards: list[str], info: Path) -> str:
    """The first of `shards` in the folder of `info`."""
    return next(u for u in shards if Path(u).parent == info.parent)


def _cut_tars(shards: list[str], key: str, found: Findings) -> None:
    """Plain tars that do not end as every tar writer ends them (a whole number of 512-byte blocks, the last two
    zero): cut short, by an interrupted copy or download. Two reads of each shard's first and last bytes."""
    cut = []
    for url in shards:
        with open(url, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if f.read(2) == b"\x1f\x8b":
                continue  # gzip: its end is checked when it is streamed
            f.seek(max(size - 2 * BLOCK, 0))
            if size % BLOCK or size < 2 * BLOCK or f.read() != bytes(2 * BLOCK):
                cut.append((url, size))
    if cut:
        url, size = cut[0]
        found.noted.append(f"{key}: {len(cut)} of {len(shards)} shards cut short (first {url}: {size:,} bytes, "
                           "without the two zero blocks a tar ends with); the run counts the samples they lost "
                           "against data.loader.max_bad_fraction and stops above it: re-copy them")


def _held(found: Findings, held: int, what: str, needs: list[tuple[str, int]]) -> None:
    """One line naming every key that asks for more than the split holds."""
    over: dict[str, list[int]] = {}
    for key, n in needs:
        if n > held:
            over.setdefault(key, []).append(n)
    if over:
        said = ", ".join(f"{k}={v[0] if len(v) == 1 else v}" for k, v in over.items())
        found.problems.append(f"{said}: more than the {held} {what}; at most {held}")


def _names(counts: dict[str, int], limit: int = 5) -> str:
    names = sorted(counts)
    return ", ".join(names[:limit]) + (f", ... {len(names) - limit} more" if len(names) > limit else "")

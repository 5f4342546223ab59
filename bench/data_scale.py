"""Scale of a webdataset source's array index (`pipelines.data.index`): build rate, bytes and memory per sample.

    python bench/data_scale.py [--samples 1000000] [--shard-size 1000] [--dir DIR] [--rounds 3]

Writes a source of tiny (8 x 8 PNG) samples in real tar shards, then measures: the index build rate with 1 and 2
worker processes (fresh folders, shards in the page cache: the header scan, not the storage); the index's bytes per
sample on disk; `nested_subset` times at 1%, 10% and 100% of the source (the first call per seed computes and
writes `order-<seed>.bin`, O(N), then O(n)); fresh-process time to the first batch; and the memory a process adds,
each in a fresh subprocess: a driver (opens the index, takes a 10% subset for a new seed), a rank (opens it, takes
a 1,000-sample subset, streams its first batch, then the same for the whole source) and a DataLoader worker
(forked from a rank: its USS is what it holds privately). Memory is private memory: USS growth after the imports
(psutil) less the clean pages of libraries' files (code every Python process of a node maps; USS counts them only
where no other process maps them, so they come and go with what else runs), with the index's memory-mapped pages
(page cache that the node's processes share once they all map it), the USS itself, and the peak RSS growth beside.

Baseline: the old index (`ShardIndex.to_json` / `from_json`: `git show 0b0d25d^:pipelines/data/shards.py`): per
shard its keys, labels, spans and lost count as one JSON that every rank loaded (`json.loads`, spans to int64
arrays). The same structure is built here for the same source and loaded in a fresh subprocess. Extrapolation to
14.2M (ImageNet-21k) and 300M samples, at the same shard size: build time, disk bytes and subset times linear in N,
the build on 64 cores at 64x the 1-worker rate, and with its serial part (the build's time beyond the shard scans
alone) left serial; memory from a 10% source and the whole one (fixed part + per-sample slope, the O(shards) part
being O(N) at a fixed shard size). Prints, last, the ratio of the old index's resident bytes per sample to a rank's
private bytes per sample with the new one (index open, 1,000-sample subset; fixed costs included).
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import torch
from torch.utils.data import DataLoader

from pipelines import data
from pipelines.data import scan as index_scan
from pipelines.data.augment import Augment, train_image
from pipelines.data.index import SourceIndex
from pipelines.data.stream import ShardStream, StreamLoader
from pipelines.data.writer import encode_png, write_samples, write_shard

ROOT = Path(__file__).resolve().parents[1]
TARGETS = (14_200_000, 300_000_000)
CORES = 64
RANK_SUBSET = 1000
DRIVER_SEED = 7
AUG = Augment(crop="none", flip=False)
MiB = 2**20


def key(shard: int, i: int) -> str:
    return f"{shard:06d}-{i:04d}"


def _write_one(job: tuple[str, int, int]) -> int:
    path, shard, count = job
    images = np.random.default_rng(shard).integers(0, 256, (count, 8, 8, 3), dtype=np.uint8)
    first = shard * count
    return write_shard(Path(path), ((key(shard, i), images[i], (first + i) * 7919 % 21843) for i in range(count)))


def _write_large(job: tuple[str, int, int, int]) -> int:
    """One shard of ImageNet-sized samples, as `pipelines.data.folder` writes them: `.jpg` (random bytes of
    `member` bytes: indexing reads no image), `.cls` and a `.json` with a path and a sha256."""
    path, shard, count, member = job
    rng = np.random.default_rng(shard)
    blob = rng.integers(0, 256, member + count, dtype=np.uint8).tobytes()
    samples = ({"__key__": key(shard, i), "jpg": blob[i:i + member], "cls": str(i % 1000).encode(),
                "json": json.dumps({"path": f"n{i:08d}/{i}.JPEG", "sha256": "0" * 64}).encode()}
               for i in range(count))
    return write_samples(Path(path), samples)


def large_member_rate(folder: Path, shards: int, shard_size: int, member: int) -> None:
    """Index build rate on shards of ImageNet-sized members (the header scan seeks over each image)."""
    folder.mkdir(parents=True)
    jobs = [(str(folder / f"{s:06d}.tar"), s, shard_size, member) for s in range(shards)]
    print(f"writing {shards} shards of {shard_size:,} samples with {member / 1e3:.0f} kB images "
          f"({shards * shard_size * member / 1e9:.1f} GB)...", flush=True)
    with ProcessPoolExecutor(2) as pool:
        list(pool.map(_write_large, jobs))
    paths, n = [path for path, *_ in jobs], shards * shard_size
    for workers in (1, 2):
        rounds = []
        for r in range(2):
            _, seconds = timed(index_scan.build, paths, folder / f"index-w{workers}-{r}", workers=workers)
            rounds.append(n / seconds)
        print(f"  {workers} worker(s), {member / 1e3:.0f} kB members: {mmm(rounds, ',.0f')} samples/s "
              f"({max(rounds) / workers:,.0f} per core; page cache warm: the header scan, not the disk)", flush=True)


def write_source(folder: Path, samples: int, shard_size: int) -> list[str]:
    """Shards of `shard_size` tiny PNG samples (labels spread over 21,843 classes, as ImageNet-21k's)."""
    folder.mkdir(parents=True)
    jobs = [(str(folder / f"{s:06d}.tar"), s, min(shard_size, samples - s * shard_size))
            for s in range(-(-samples // shard_size))]
    start, step = time.perf_counter(), max(1, len(jobs) // 10)
    with ProcessPoolExecutor(2) as pool:
        for done, _ in enumerate(pool.map(_write_one, jobs, chunksize=4), 1):
            if done % step == 0 or done == len(jobs):
                print(f"  wrote {done:,} / {len(jobs):,} shards ({time.perf_counter() - start:.0f} s)", flush=True)
    return [path for path, _, _ in jobs]


def mmm(values: list[float], fmt: str = ".3f") -> str:
    """min / median / max of `values`."""
    return " / ".join(format(v, fmt) for v in (min(values), float(np.median(values)), max(values)))


def timed(fn, *args, **kwargs) -> tuple[object, float]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def subset_times(index: SourceIndex, rounds: int) -> dict[float, tuple[float, list[float]]]:
    """Per fraction of the source: the first `nested_subset` call for a new seed (order built) and warm calls."""
    out = {}
    for k, frac in enumerate((0.01, 0.1, 1.0)):
        n, seed = max(1, round(frac * len(index))), 100 + k
        _, first = timed(data.nested_subset, index, n, seed)
        warm = [timed(data.nested_subset, index, n, seed)[1] for _ in range(rounds)]
        (index.folder / f"order-{seed}.bin").unlink()
        out[frac] = (first, warm)
    return out


def old_json(index: SourceIndex) -> str:
    """The old `ShardIndex.to_json` of this source: per shard keys, labels, spans (image offset and size, -1 for
    the absent .json) and lost."""
    ends = np.asarray(index.shard_end, dtype=np.int64)
    keys, labels, spans = [], [], []
    for s in range(index.num_shards):
        lo, hi = index.shard_start(s), int(ends[s])
        keys.append([key(s, i) for i in range(hi - lo)])
        labels.append(np.asarray(index.label[lo:hi]).tolist())
        offsets, sizes = np.asarray(index.offset[lo:hi]) + 512, np.asarray(index.size[lo:hi]) - 1536
        spans.append([[int(o), int(z), -1, -1] for o, z in zip(offsets, sizes, strict=True)])
    return json.dumps({"shards": index.shards, "keys": keys, "labels": labels, "lost": [0] * index.num_shards,
                       "spans": spans})


# -- in the probe subprocesses -----------------------------------------------------------------------------------


def memory(pid: int | None = None, root: str = "/nowhere/") -> dict[str, int]:
    """USS of a process (this one by default); of it, `lib`: clean pages of files outside `root` (libraries' code,
    that every Python process of a node maps: which count in USS depends on what else runs), and `mapped`: pages of
    files under `root` (the index's memory-mapped columns: page cache the node's processes share once they all map
    it); and its peak RSS (VmHWM)."""
    if pid is None:
        gc.collect()
    proc, lib, mapped, path = Path(f"/proc/{pid or 'self'}"), 0, 0, ""
    for line in (proc / "smaps").read_text().splitlines():
        if re.match(r"[0-9a-f]+-[0-9a-f]+ ", line):
            fields = line.split(maxsplit=5)
            path = fields[5] if len(fields) > 5 else ""
        elif line.startswith(("Private_Clean:", "Private_Dirty:")):
            size = int(line.split()[1]) * 1024
            if path.startswith(root):
                mapped += size
            elif path.startswith("/") and line.startswith("Private_Clean:"):
                lib += size
    peak = int(re.search(r"VmHWM:\s+(\d+)", (proc / "status").read_text()).group(1)) * 1024
    return {"uss": psutil.Process(pid).memory_full_info().uss, "lib": lib, "mapped": mapped, "peak": peak}


def first_batch(subset: data.ShardSubset, workers: int = 0):
    """A ShardStream of `subset` through a StreamLoader, and its first batch (the iterator kept alive)."""
    batches = iter(StreamLoader(ShardStream(subset, 8, 32, AUG, seed=0), workers=workers).batches())
    return batches, next(batches)


def _warm_up() -> None:
    """Decode one PNG through the training path and pass a batch through a DataLoader, so lazy imports and code
    pages first touched do not count as memory the index adds; then reset the peak RSS (VmHWM) to the current RSS."""
    image = train_image(encode_png(np.zeros((8, 8, 3), np.uint8)), 8, AUG, np.random.default_rng(0))
    for item in DataLoader([{"image": image[None], "label": np.zeros(1, np.int64), "step": 0}], batch_size=None):
        torch.as_tensor(item["image"]), torch.as_tensor(item["label"])
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")


def probe(role: str, path: str, n: int) -> None:
    """One measurement in a fresh process; prints {phase: memory} as JSON. `path`: the index folder (old: its
    JSON); `n`: the subset size (capped at the source's)."""
    if role in ("import", "first-batch"):  # timed from outside, and here from after the imports
        start = time.perf_counter()
        if role == "first-batch":
            index = SourceIndex(path)
            first_batch(data.nested_subset(index, min(n, len(index)), 0))
        print(json.dumps({"seconds": time.perf_counter() - start}))
        return
    _warm_up()
    root = str(Path(path).resolve().parent) + os.sep  # the run's folder: the index, shards
    mem = functools.partial(memory, root=root)
    out = {"base": mem()}
    if role == "old":
        text = Path(path).read_text()
        raw = json.loads(text)
        spans = [np.asarray(s, dtype=np.int64).reshape(-1, 4) for s in raw["spans"]]
        kept = (raw["shards"], raw["keys"], raw["labels"], raw["lost"], spans)  # what ShardIndex holds
        del text, raw
        out["old: ShardIndex.from_json"] = mem()
        print(json.dumps(out), flush=True)
        return
    index = SourceIndex(path)
    if role == "driver":
        kept = data.nested_subset(index, max(1, len(index) // 10), DRIVER_SEED)
        out["driver: index + 10% subset, order built"] = mem()
    if role == "rank":
        kept = [len(index), index.shard_url(0), data.nested_subset(index, min(RANK_SUBSET, len(index)), 0)]
        out["rank: index + 1,000 subset"] = mem()
        kept.append(first_batch(kept[-1]))
        out["rank: + its first batch"] = mem()
        kept.append(first_batch(data.nested_subset(index, len(index), 0)))
        out["rank: + whole-source subset, first batch"] = mem()
    if role == "worker":
        kept = first_batch(data.nested_subset(index, min(n, len(index)), 0), workers=1)
        time.sleep(1.0)  # its prefetch settles
        out[f"worker ({'whole source' if n > RANK_SUBSET else '1,000 subset'})"] = memory(
            psutil.Process().children()[0].pid, root)
    print(json.dumps(out), flush=True)
    del kept
    os._exit(0)  # no DataLoader shutdown to wait for


def run_probe(role: str, path: Path, n: int = 0) -> tuple[dict, float]:
    """Run `probe` in a fresh interpreter; returns its JSON result and the wall time of the whole process."""
    code = ("import sys; sys.path.insert(0, 'bench'); import data_scale; "
            "data_scale.probe(*sys.argv[1:3], int(sys.argv[3]))")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, role, str(path), str(n)], cwd=ROOT, capture_output=True,
                          text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"probe {role} failed:\n{done.stderr[-3000:]}")
    lines = done.stdout.strip().splitlines()
    return (json.loads(lines[-1]) if lines else {}), wall


# -- the report ------------------------------------------------------------------------------------------------


def added(role: str, path: Path, n: int = 0) -> dict[str, dict[str, int | None]]:
    """Memory per phase of a probe: growth over its own state after the imports (a forked worker's USS: all its
    own; its peak RSS, counting the pages it shares with the rank, is left out). `private`: USS less `lib`."""
    out = run_probe(role, path, n)[0]
    base = out.pop("base")
    grown = {name: {k: v - (0 if role == "worker" else base[k]) for k, v in mem.items()} for name, mem in out.items()}
    for mem in grown.values():
        mem["private"], mem["peak"] = mem["uss"] - mem["lib"], None if role == "worker" else mem["peak"]
    return grown


def memory_report(sources: list[tuple[Path, Path, int]]) -> tuple[float, float]:
    """Memory each process adds at a 10% source and the whole one (folder, old JSON, N), extrapolated from the
    two: the whole source's value plus the per-sample slope between them (clipped at 0) times the extra samples.
    Returns the old index's and a rank's private bytes per sample at the whole source."""
    got = [{**added("old", old), **added("driver", folder), **added("rank", folder),
            **added("worker", folder, RANK_SUBSET), **added("worker", folder, 2**40)} for folder, old, _ in sources]
    (small, n_small), (full, n) = ((g, src[2]) for g, src in zip(got, sources, strict=True))
    print(f"memory added per process, MiB: private = USS less libraries' code pages (of it the index's mapped pages; "
          f"USS; libraries' code; peak RSS growth) at {n:,} samples | private at {n_small:,} | slope | at 14.2M | "
          f"300M samples:")
    for name, m in full.items():
        slope = max(0.0, (m["private"] - small[name]["private"]) / (n - n_small))
        peak = "" if m["peak"] is None else f"; peak {m['peak'] / MiB:,.1f}"
        print(f"  {name:<42} {m['private'] / MiB:6.2f} ({m['mapped'] / MiB:.2f} mapped; USS {m['uss'] / MiB:.2f}; "
              f"lib {m['lib'] / MiB:.2f}{peak}) | {small[name]['private'] / MiB:.2f} | {slope:.2f} B/sample | "
              + " | ".join(f"{(m['private'] + slope * (t - n)) / MiB:,.0f}" for t in TARGETS))
    per = {name: m["private"] / n for name, m in full.items()}
    old, first = per["old: ShardIndex.from_json"], full["rank: index + 1,000 subset"]
    rank = max(first["private"], 4096) / n  # at least a page: noise may read as 0
    print(f"private bytes per sample at {n:,} samples: old index {old:.1f} (per process, every rank), new rank "
          f"{rank:.2f} (index + 1,000 subset, fixed costs included; with its first batch "
          f"{per['rank: + its first batch']:.2f}, then a whole-source subset and its first batch "
          f"{per['rank: + whole-source subset, first batch']:.2f}); on USS as measured, old/new "
          f"{full['old: ShardIndex.from_json']['uss'] / max(first['uss'], 4096):.1f}x; at 300M the old index is "
          f"{old * TARGETS[1] / 2**30:,.0f} GiB per process")
    return old, rank


def time_report(folder: Path, n: int, rounds: int) -> None:
    """Fresh process start to first batch, against a process that only imports the same modules; and the time
    from after the imports (less noisy: what the extrapolation uses)."""
    runs = {"import only": ("import", 0), "first batch, 1,000 subset": ("first-batch", RANK_SUBSET),
            "first batch, whole": ("first-batch", n)}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for r in range(rounds):
        for name in list(runs)[:: 1 if r % 2 == 0 else -1]:
            out, wall = run_probe(runs[name][0], folder, runs[name][1])
            times[name].append((wall, out["seconds"]))
    print(f"fresh process to first batch, min / median / max of {rounds} (s): whole process | after the imports")
    for name, values in times.items():
        print(f"  {name:<28} {mmm([w for w, _ in values])} | {mmm([a for _, a in values])}")
    (base, _), (small, small_in), (whole, whole_in) = (np.median(v, axis=0) for v in times.values())
    print(f"  minus the import-only process: 1,000 subset {small - base:.3f} s, whole source {whole - base:.3f} s; "
          f"at 14.2M | 300M, after the imports (the 1,000 subset's, and the whole source's excess linearly): "
          + " | ".join(f"{small_in + max(0.0, whole_in - small_in) * t / n:.2f} s" for t in TARGETS))


def build_report(shards: list[str], root: Path, n: int) -> SourceIndex:
    """Index build rate with 1 and 2 workers (fresh folders); bytes on disk; returns the 1-worker index."""
    rates = {}
    for workers in (1, 2):
        print(f"building the index with {workers} worker(s)...", flush=True)
        index, seconds = timed(index_scan.build, shards, root / f"index-w{workers}", workers=workers)
        rates[workers] = n / seconds
        print(f"  {workers} worker(s): {seconds:.2f} s, {rates[workers]:,.0f} samples/s", flush=True)
    per_core, (_, scan) = rates[1], timed(lambda: [index_scan.scan_shard(s).lost for s in shards])
    serial = max(0.0, n / per_core - scan)  # the merge (hashes, columns, duplicate check) in the build's process
    print(f"index build on {CORES} cores at {n:,} | 14.2M | 300M samples, at {CORES}x the 1-worker rate "
          f"({per_core:,.0f} samples/s/core; 2 workers here: {rates[2] / rates[1]:.2f}x): "
          + " | ".join(f"{t / (per_core * CORES):,.1f} s" for t in (n, *TARGETS))
          + f"; with its serial part (the scans alone took {scan:.2f} s of {n / per_core:.2f}, the rest runs in "
          f"one process; both linear in N): " + " | ".join(f"{(scan / CORES + serial) * t / n:,.1f} s"
                                                           for t in (n, *TARGETS)))
    index = SourceIndex(root / "index-w1")
    files = sorted(index.folder.iterdir())  # no order-<seed>.bin yet
    disk = sum(p.stat().st_size for p in files)
    print(f"index on disk ({', '.join(p.name for p in files)}): {disk / n:.2f} bytes/sample; at {n:,} | 14.2M | "
          f"300M: " + " | ".join(f"{disk * t / n / MiB:,.1f} MiB" for t in (n, *TARGETS))
          + "; plus 4 bytes/sample per subset seed (order-<seed>.bin)", flush=True)
    return index


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1_000_000)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--dir", type=Path, default=None,
                        help="work folder, new or empty (default: a temp folder, deleted at the end)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--large-shards", type=int, default=4,
                        help="also index this many shards of ImageNet-sized (~110 kB) members (0: skip)")
    parser.add_argument("--member-bytes", type=int, default=110_000)
    args = parser.parse_args()
    n, started = args.samples, time.perf_counter()
    root = Path(args.dir or tempfile.mkdtemp(prefix="data-scale-"))
    try:
        print(f"writing {n:,} samples (8 x 8 PNG) in shards of {args.shard_size:,} under {root}...", flush=True)
        shards = write_source(root / "shards", n, args.shard_size)
        index = build_report(shards, root, n)
        if args.large_shards:
            large_member_rate(root / "large", args.large_shards, args.shard_size, args.member_bytes)
            shutil.rmtree(root / "large")
        print(f"nested_subset (s; first call for a new seed builds its order, then {args.rounds} warm calls "
              f"min / median / max; linear in N at 14.2M | 300M):", flush=True)
        for frac, (first, warm) in subset_times(index, args.rounds).items():
            med = float(np.median(warm))
            print(f"  {frac:>5.0%} ({round(frac * n):,}): first {first:.4f}, warm {mmm(warm, '.4f')} | "
                  + " | ".join(f"first {first * t / n:.1f}, warm {med * t / n:.2f}" for t in TARGETS))
        sources = []
        for part, folder in ((max(1, len(shards) // 10), root / "index-small"), (len(shards), index.folder)):
            src = index_scan.build(shards[:part], folder) if part < len(shards) else index
            src.order(0)  # the driver's first subset for seed 0 writes it; the probes find it
            sources.append((src.folder, folder.with_suffix(".json"), len(src)))
            sources[-1][1].write_text(old_json(src))
        print(f"old JSON index: {sources[-1][1].stat().st_size / n:.1f} bytes/sample on disk", flush=True)
        os.sync()  # the written files clean in the page cache: mapped, they read as the file pages they are
        time_report(index.folder, n, args.rounds)
        old, new = memory_report(sources)
        print(f"run took {time.perf_counter() - started:.0f} s")
        print(f"old/new resident bytes per sample: {old / new:.1f}x (private: USS less libraries' code pages)")
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

"""The array index (`pipelines.data.index`) on real shards, real processes and a real HTTP server: repeated keys,
bounded open shard files, concurrent builds, remote shards indexed from their sidecars, and memory that does not
grow with the source by a Python object per sample."""

from __future__ import annotations

import functools
import http.server
import itertools
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from pipelines import data
from pipelines.data.augment import Augment
from pipelines.data.reader import DataError
from pipelines.data.sources import expand_urls
from pipelines.data.stream import ShardStream, StreamLoader
from pipelines.data.writer import encode_png, write_samples, write_shard
from tests.conftest import ROOT

PLAIN = Augment(crop="none", flip=False)  # the pixels as written: what a test can compare


def _write(folder: Path, shards: list[list[str]], seed: int = 0) -> tuple[list[str], list[tuple[str, np.ndarray, int]]]:
    """Real shards `train-<s>.tar` of random 8x8 PNGs holding the given keys; sample i of shard s has label
    (s + i) % 3.

    Returns:
        the shard paths and every sample written, (key, image, label), in shard and tar order.
    """
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths, written = [], []
    for s, keys in enumerate(shards):
        samples = [(key, rng.integers(0, 255, (8, 8, 3), dtype=np.uint8), (s + i) % 3) for i, key in enumerate(keys)]
        write_shard(folder / f"train-{s}.tar", samples)
        paths.append(str(folder / f"train-{s}.tar"))
        written += samples
    return paths, written


def _grid(shards: int, per_shard: int) -> list[list[str]]:
    """Unique keys `<s>-<i>` for `shards` shards of `per_shard` samples."""
    return [[f"{s}-{i:03d}" for i in range(per_shard)] for s in range(shards)]


def _child(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `code` in a fresh Python process from the repository root; its last stdout line is JSON."""
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def _result(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- 1. a key in two shards ------------------------------------------------------------------------------------------


def test_a_key_in_two_shards_is_refused_naming_both(tmp_path):
    keys = _grid(2, 10)
    keys[1][1] = keys[0][4]  # shard 1 repeats a key of shard 0 (with other pixels and another label)
    shards, written = _write(tmp_path / "shards", keys)
    n = len(written)
    first = {}
    for key, image, label in written:
        first.setdefault(key, (image, label))
    kept = [key for key, _, _ in written[:10]] + [key for key, _, _ in written[10:] if key != keys[0][4]]

    with pytest.raises(DataError) as refused:
        data.cached_index(shards, tmp_path / "index")
    message = str(refused.value)
    assert shards[0] in message and shards[1] in message, message
    assert "keep the first copy" in message and "duplicates: first" in message, message
    assert not list((tmp_path / "index").iterdir())  # nothing half-built left behind

    index = data.SourceIndex(data.cached_index(shards, tmp_path / "index", duplicates="first"))
    assert index.meta["duplicates_dropped"] == 1
    assert index.meta["num_samples"] == n - 1 and len(index) == n - 1, \
        f"{n - 1} rows are kept, but the index says it holds {len(index)} (meta {index.meta})"
    rows = np.arange(len(index))
    assert np.asarray(index.shard_end).tolist() == [10, n - 1]
    found = index.keys_of(rows)
    assert found == kept and len(set(found)) == len(found)
    assert index.labels_of(rows).tolist() == [first[key][1] for key in kept]
    few = np.array([0, 4, 9, 10, 11, n - 2])  # both sides of the dropped row and of the shard boundary
    back = data.load(data.ShardSubset(index, few), 8)
    assert back.keys == [kept[p] for p in few] == index.keys_of(few)
    assert back.labels.tolist() == [first[kept[p]][1] for p in few] == index.labels_of(few).tolist()
    assert all(np.array_equal(image, first[key][0]) for image, key in zip(back.images, back.keys, strict=True))
    subset = data.nested_subset(index, len(index), seed=0)  # a whole-source subset is every kept row
    assert subset.positions.tolist() == rows.tolist() and subset.labels.tolist() == index.labels_of(rows).tolist()

    urls = str(tmp_path / "shards" / "train-{0..1}.tar")
    src = data.SourceConfig(source="webdataset", urls=urls, size=n - 1, num_classes=3, image_size=8)
    with pytest.raises(DataError, match="keep the first copy") as refused:
        data.prepare(src, tmp_path / "cache", progress=False)
    assert shards[0] in str(refused.value) and shards[1] in str(refused.value)
    keep_first = data.SourceConfig(**{**src.__dict__, "duplicates": "first"})
    prepared = data.prepare(keep_first, tmp_path / "cache", progress=False)
    assert len(prepared.index()) == n - 1 and prepared.index().keys_of(range(n - 1)) == kept
    assert data.load(prepared.subset(), 8).keys == kept
    with pytest.raises(DataError, match=rf"declares size {n}, but its 2 shards \({re.escape(urls)}\) hold {n - 1} "
                                        rf"readable samples; declare size: {n - 1} or fewer$"):
        data.prepare(data.SourceConfig(**{**keep_first.__dict__, "size": n}), tmp_path / "cache", progress=False)


# -- 2. open shard files -------------------------------------------------------------------------------------------

_READER = r"""
import json, os, resource, sys
from collections import Counter
from pipelines import data
from pipelines.data.augment import Augment
from pipelines.data.reader import DataError
from pipelines.data.stream import ShardStream, StreamLoader

def fds():  # open descriptors (counting the one that lists them); -1 where none is left to list them
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return -1

folder, open_shards, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
base = fds()  # after the imports
if mode == "bounded":  # room for the index's maps and `open_shards` shards, not for all 40
    resource.setrlimit(resource.RLIMIT_NOFILE, (base + 20, hard))

def loader():
    index = data.SourceIndex(folder)
    stream = ShardStream(data.nested_subset(index, len(index), seed=0), 8, batch_size=20,
                         augment=Augment(crop="none", flip=False), seed=1, open_shards=open_shards)
    return StreamLoader(stream, workers=0), len(index)

load, n = loader()
load.stream.index.shard_url(0)  # maps the shard list (once, lazily): not a shard file
if mode == "starved":  # a first read elsewhere (lazy imports), then no descriptor left for a shard
    next(loader()[0].batches()).keys
    probe = os.open(os.devnull, os.O_RDONLY)
    os.close(probe)
    resource.setrlimit(resource.RLIMIT_NOFILE, (probe, hard))
ready = fds()
seen, most = [Counter(), Counter()], 0
try:
    for batch in load.batches():
        most = max(most, fds())
        for key, epoch in zip(batch.keys, batch.sample_epochs):
            seen[int(epoch)][key] += 1
        if batch.end_of_epoch and batch.epoch == 1:
            break
except DataError as err:
    print(json.dumps({"error": str(err), "bad": {e: dict(c) for e, c in load.bad.items()}}))
    sys.exit(0)
print(json.dumps({"base": base, "ready": ready, "most": most, "limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
                  "n": n, "seen": [dict(c) for c in seen], "bad": {e: dict(c) for e, c in load.bad.items()}}))
"""


def test_open_shards_are_bounded_and_an_os_error_is_not_a_bad_sample(tmp_path):
    shards, written = _write(tmp_path / "shards", _grid(40, 5))
    folder = str(data.cached_index(shards, tmp_path / "index", workers=1))
    keys = {key for key, _, _ in written}

    bounded = _result(_child(_READER, folder, "8", "bounded"))
    assert bounded.get("error") is None, bounded
    assert bounded["limit"] == bounded["base"] + 20 < bounded["base"] + len(shards)
    assert bounded["most"] <= bounded["ready"] + 8  # at most `open_shards` shard files open at once
    for epoch in (0, 1):
        assert set(bounded["seen"][epoch]) == keys and set(bounded["seen"][epoch].values()) == {1}
    assert bounded["bad"] == {}  # no sample counted unreadable

    # The same limit with every shard kept open fails: the limit is what the bound above was tested against.
    unbounded = _result(_child(_READER, folder, "64", "bounded"))
    assert "Too many open files" in unbounded.get("error", ""), unbounded

    starved = _result(_child(_READER, folder, "8", "starved"))
    message = starved.get("error", "")
    assert "Too many open files" in message or "errno 24" in message, starved
    assert "not the data" in message and "cannot read shard" in message, message
    assert any(shard in message for shard in shards), message  # names the shard
    assert "truncated" not in message and starved["bad"] == {}, starved  # an OS error, not a bad sample


# -- 3. concurrent builds -----------------------------------------------------------------------------------------

_BUILDER = r"""
import json, sys, time
from pathlib import Path
from pipelines import data
from pipelines.data import scan as index_scan

shards, root, sync, me = json.loads(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]

def until(done, what):
    deadline = time.monotonic() + 60
    while not done():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.01)

real, built = index_scan.build, []

def build(*args, **kwargs):  # the real build, entered by both processes before either writes a file
    (sync / f"building-{me}").touch()
    until(lambda: len(list(sync.glob("building-*"))) == 2, "the other build")
    built.append(True)
    return real(*args, **kwargs)

index_scan.build = build
(sync / f"ready-{me}").touch()
until(lambda: (sync / "go").exists(), "go")
folder = data.cached_index(shards, root)
print(json.dumps({"folder": str(folder), "built": bool(built), "rows": len(data.SourceIndex(folder))}))
"""


def test_two_processes_indexing_one_source_leave_one_valid_index(tmp_path):
    shards, written = _write(tmp_path / "shards", _grid(20, 10))
    root, sync = tmp_path / "index", tmp_path / "sync"
    sync.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", _BUILDER, json.dumps(shards), str(root), str(sync), str(i)],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        deadline = time.monotonic() + 60
        while len(list(sync.glob("ready-*"))) < 2:
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            assert time.monotonic() < deadline, "the builders did not start"
            time.sleep(0.05)
        (sync / "go").touch()
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    results = []
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert all(r["built"] for r in results)  # both raced through a whole build
    assert results[0]["folder"] == results[1]["folder"]
    assert [r["rows"] for r in results] == [len(written)] * 2
    entries = sorted(p.name for p in root.iterdir())
    assert entries == [Path(results[0]["folder"]).name], entries  # one index folder, no temp folder left
    index = data.SourceIndex(results[0]["folder"])
    assert len(index) == len(written) and index.meta["num_shards"] == 20
    assert index.keys_of(range(len(index))) == [key for key, _, _ in written]
    assert index.labels_of(np.arange(len(index))).tolist() == [label for _, _, label in written]


# -- 4. http shards -------------------------------------------------------------------------------------------------


class _Counting(http.server.SimpleHTTPRequestHandler):
    """Serves a folder and records each request as (method, path)."""

    requests: list[tuple[str, str]] = []

    def do_GET(self):  # noqa: N802 (the http.server name)
        self.requests.append(("GET", self.path))
        super().do_GET()

    def do_HEAD(self):  # noqa: N802
        self.requests.append(("HEAD", self.path))
        super().do_HEAD()

    def log_message(self, *args):
        pass


@pytest.fixture
def served(tmp_path):
    """A folder served over HTTP on 127.0.0.1; yields (folder, base URL, the list of requests)."""
    folder = tmp_path / "www"
    folder.mkdir()
    handler = type("Handler", (_Counting,), {"requests": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield folder, f"http://127.0.0.1:{server.server_address[1]}", handler.requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _columns(index: data.SourceIndex) -> dict[str, list]:
    return {name: np.asarray(getattr(index, name)).tolist() for name in ("offset", "size", "label", "key", "shard_end")}


def test_http_shards_are_indexed_and_trained_through_a_real_server(served, tmp_path):
    folder, base, requests = served
    local, written = _write(folder, [[f"{s}-{i:03d}" for i in range(n)] for s, n in enumerate((30, 20, 25))])
    n, tars = len(written), [f"/train-{s}.tar" for s in range(3)]
    urls = f"{base}/train-{{0..2}}.tar"
    assert expand_urls(urls) == [base + tar for tar in tars]
    src = data.SourceConfig(source="webdataset", urls=urls, size=n, num_classes=3, image_size=8)

    # (a) indexed from the sidecars: no shard byte fetched
    prepared = data.prepare(src, tmp_path / "cache", progress=False)
    index = prepared.index()
    assert [path for method, path in requests if method == "GET" and path.endswith(".tar")] == []
    assert {path for method, path in requests if method == "GET"} == {tar + ".idx.json" for tar in tars}
    assert {path for method, path in requests if method == "HEAD"} == set(tars)  # identity: Last-Modified, length
    assert len(index) == n and not np.asarray(index.shard_seekable).any() and index.shards == expand_urls(urls)
    reference = data.SourceIndex(data.cached_index(local, tmp_path / "local-index", workers=1))
    assert _columns(index) == _columns(reference)  # the sidecars hold what a scan of the local files finds

    # (b) one epoch streamed from the server: every sample once
    requests.clear()
    stream = ShardStream(data.nested_subset(index, len(index), seed=0), 8, batch_size=15, augment=PLAIN, seed=1,
                         shuffle_buffer=16)
    loader = StreamLoader(stream, workers=0)
    batches = list(itertools.islice(loader.batches(), n // 15))
    seen = Counter(key for batch in batches for key in batch.keys)
    assert seen == Counter(key for key, _, _ in written)
    assert all(set(batch.sample_epochs.tolist()) == {0} for batch in batches) and loader.skipped(0) == {}
    labels = {key: label for key, _, label in written}
    assert all(labels[key] == int(label) for batch in batches for key, label in zip(batch.keys, batch.labels,
                                                                                    strict=True))
    assert {path for method, path in requests if method == "GET"} >= set(tars)

    # (c) without sidecars, a fresh cache: the shards are streamed to index them, to the same rows
    for tar in tars:
        (folder / (tar.lstrip("/") + ".idx.json")).unlink()
    requests.clear()
    again = data.prepare(src, tmp_path / "cache-2", progress=False).index()
    assert {path for method, path in requests if method == "GET" and path.endswith(".tar")} == set(tars)
    assert len(again) == n and _columns(again) == _columns(index)


# -- 5. memory per sample ------------------------------------------------------------------------------------------

_MEASURE = r"""
import json, pickle, sys, tracemalloc
from pipelines import data
from pipelines.data.augment import Augment
from pipelines.data.stream import ShardStream

def python_heap(snapshot):  # domain 0: Python objects (numpy's buffers are traced in a domain of their own)
    return sum(s.size for s in snapshot.filter_traces([tracemalloc.DomainFilter(True, 0)]).statistics("filename"))

tracemalloc.start()
before = tracemalloc.take_snapshot()
index = data.SourceIndex(sys.argv[1])
subset = data.nested_subset(index, len(index), seed=0)
stream = ShardStream(subset, 8, batch_size=64, augment=Augment(crop="none", flip=False), seed=1, rank=1,
                     world_size=2)
built = tracemalloc.take_snapshot()
peak = tracemalloc.get_traced_memory()[1]
batch = next(iter(stream))  # what a loader worker holds once it reads
read = tracemalloc.take_snapshot()
print(json.dumps({"n": len(index), "built": python_heap(built) - python_heap(before), "peak": peak,
                  "read": python_heap(read) - python_heap(before), "pickled": len(pickle.dumps(stream)),
                  "batch": len(batch["key"])}))
"""


def _png_shard(job: tuple[Path, int, int]) -> int:
    """One shard of `n` samples sharing one tiny PNG (the index and the loader never look at pixels here)."""
    path, s, n = job
    png = encode_png(np.full((8, 8, 3), s % 251, np.uint8))
    return write_samples(path, ({"__key__": f"{s}-{i:05d}", "png": png, "cls": b"%d" % (i % 10)} for i in range(n)))


def test_loader_workers_and_ranks_hold_no_per_sample_python_objects(tmp_path):
    """Open index + whole-source subset + a rank's ShardStream, for 5,000 and 50,000 samples: the Python heap they
    keep (and a first batch read) does not grow with N, the traced peak grows only by a few int64 columns' worth
    (numpy buffers, 8 bytes a sample each), and a DataLoader worker is sent 8 bytes a sample (the rows array).
    A Python object per sample (an int, a key string, a tuple) costs 36 bytes or more."""
    sizes = {"small": 5_000, "big": 50_000}
    jobs = {name: [(tmp_path / name / f"train-{s}.tar", s, 1_000) for s in range(n // 1_000)]
            for name, n in sizes.items()}
    for name in sizes:
        (tmp_path / name).mkdir()
    with ProcessPoolExecutor(max_workers=2) as pool:
        assert sum(pool.map(_png_shard, [job for part in jobs.values() for job in part])) == sum(sizes.values())
    found = {}
    for name, n in sizes.items():
        folder = data.cached_index([str(path) for path, _, _ in jobs[name]], tmp_path / name / "index", workers=2)
        found[name] = _result(_child(_MEASURE, str(folder)))
        assert found[name]["n"] == n and found[name]["batch"] == 32
    small, big = found["small"], found["big"]
    more = sizes["big"] - sizes["small"]
    report = json.dumps(found)
    assert big["built"] - small["built"] < 100_000, report  # kept Python objects: constant, whatever N
    assert big["read"] - small["read"] < 100_000, report
    assert (big["peak"] - small["peak"]) / more <= 32, report  # <= 4 int64 columns at once (measured: 3)
    assert (big["pickled"] - small["pickled"]) / more < 10, report


def test_the_index_command_indexes_shards_it_did_not_write(tmp_path, cache_dir):
    """`python -m pipelines.data.index` on shards without sidecars: the index, a sidecar per shard (from which a
    remote copy is then indexed without being read), and one line for a user's error."""
    from pipelines.data.index import SourceIndex, scratch_index
    from tests.conftest import run_cli

    shards, _ = _write(tmp_path / "in", _grid(4, 25))
    for side in (tmp_path / "in").glob("*.idx.json"):
        side.unlink()  # shards this project did not write carry none
    piped = run_cli(["-m", "pipelines.data.index", f"pipe:cat {tmp_path / 'in' / 'train-{0..3}.tar'}", "--out",
                     str(tmp_path / "piped")], cache_dir)  # streamed: the probe for a sidecar finds none, quietly
    assert piped.returncode == 0 and piped.stderr == "", piped.stderr  # (was `cat: ...: No such file` x2 a shard)
    proc = run_cli(["-m", "pipelines.data.index", str(tmp_path / "in" / "train-{0..3}.tar"), "--out",
                    str(tmp_path / "idx"), "--workers", "2"], cache_dir)
    assert proc.returncode == 0, proc.stderr
    assert "100 samples in 4 shards indexed in" in proc.stdout
    index = SourceIndex(tmp_path / "idx")
    assert len(index) == 100 and index.meta["workers"] == 2
    assert all(os.path.exists(f"{s}.idx.json") for s in shards)  # <shard>.tar.idx.json
    remote = scratch_index([f"pipe:cat {s}" for s in shards])
    assert np.array_equal(remote.key, index.key) and np.array_equal(remote.offset, index.offset)
    again = run_cli(["-m", "pipelines.data.index", str(tmp_path / "in" / "train-{0..4}.tar"), "--out",
                     str(tmp_path / "idx2")], cache_dir)
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "train-4.tar" in again.stderr


def test_the_index_command_on_a_read_only_data_mount_writes_the_index_without_sidecars(tmp_path, cache_dir):
    """Shards on a read-only mount (as data often is): one note that no sidecars are written, and the index (it was
    a process pool's traceback and no index, the sidecars written by default)."""
    import subprocess

    from pipelines.data.index import SourceIndex
    from tests.conftest import run_cli

    _write(tmp_path / "in", _grid(2, 10))
    for side in (tmp_path / "in").glob("*.idx.json"):
        side.unlink()
    (tmp_path / "ro").mkdir()
    if subprocess.run(["mount", "--bind", "-o", "ro", str(tmp_path / "in"), str(tmp_path / "ro")],
                      capture_output=True).returncode:
        pytest.skip("no read-only bind mount here (needs root and a mount namespace that allows it)")
    try:
        proc = run_cli(["-m", "pipelines.data.index", str(tmp_path / "ro" / "train-{0..1}.tar"), "--out",
                        str(tmp_path / "idx"), "--workers", "2"], cache_dir)
    finally:
        subprocess.run(["umount", str(tmp_path / "ro")], check=True)
    assert proc.returncode == 0, proc.stderr
    assert f"note: no sidecars written: {tmp_path / 'ro'} cannot be written (a read-only file system)" in proc.stderr
    assert "Traceback" not in proc.stderr and len(SourceIndex(tmp_path / "idx")) == 20
    assert not list((tmp_path / "in").glob("*.idx.json"))


# -- 6. shards in several folders -----------------------------------------------------------------------------------


def test_shards_in_several_folders_are_counted_by_each_folders_own_info_json(tmp_path):
    """`a/train-{0..3}.tar;b/train-{0..3}.tar`: the same shard names in two folders, each with its `_info.json`. Each
    shard's count comes from its own folder's file (by name alone, folder b's shards took folder a's counts: the true
    size was refused, and the counts a cut tar lost were wrong), in indexing, the size check and the dry run."""
    from pipelines.data.preflight import inspect
    from pipelines.data.sources import write_info

    for folder, per in (("a", 10), ("b", 8)):
        _write(tmp_path / folder, [[f"{folder}{s}-{i}" for i in range(per)] for s in range(4)])
        write_info(tmp_path / folder, "train", [f"train-{s}.tar" for s in range(4)], [per] * 4, num_classes=3)
    urls = f"{tmp_path}/a/train-{{0..3}}.tar;{tmp_path}/b/train-{{0..3}}.tar"
    src = lambda size: data.SourceConfig(source="webdataset", urls=urls, size=size, num_classes=3)  # noqa: E731
    index = data.prepare(src(72), tmp_path / "cache").index()
    assert len(index) == 72 and index.lost == 0 and not index.shard_lost.any()
    with pytest.raises(DataError, match=r"declares size 73, but the _info.json files of its 2 folders list 72"):
        data.prepare(src(73), tmp_path / "cache")
    assert inspect(src(72), "data.pretrain").problems == []
    (problem,) = inspect(src(73), "data.pretrain").problems
    assert problem.startswith("data.pretrain.size=73: more than the 72 samples the _info.json files of their 2 "
                              "folders list for these shards")
    from pipelines.data import _listed_for_key

    one = [f"{tmp_path}/a/train-{s}.tar" for s in range(2)]  # one folder: keyed as every index before this was
    assert _listed_for_key(one) == {f"train-{s}.tar": 10 for s in range(4)}  # (by name, the folder's whole listing)
    raw = (tmp_path / "b" / "train-1.tar").read_bytes()  # cut in b: lost counts come from b's own _info.json
    (tmp_path / "b" / "train-1.tar").write_bytes(raw[:len(raw) // 2])
    cut = data.prepare(src(60), tmp_path / "cache2", max_bad_fraction=0.5).index()
    assert cut.lost == 72 - len(cut) and int(cut.shard_lost[5]) == 8 - (len(cut) - 64)


def test_a_test_split_is_checked_for_lost_samples_and_its_declared_size(tmp_path):
    """A test split's shards are held to what train's are: samples a cut tar lost count against max_bad_fraction,
    and `test_size` must be there (before, evaluation silently scored fewer test images)."""
    train, _ = _write(tmp_path / "train", _grid(2, 10))
    test, _ = _write(tmp_path / "test", [[f"t{s}-{i}" for i in range(10)] for s in range(4)])
    from pipelines.data.sources import write_info

    write_info(tmp_path / "test", "test", [os.path.basename(u) for u in test], [10] * 4)
    src = lambda test_size=0: data.SourceConfig(  # noqa: E731
        source="webdataset", urls=f"{tmp_path}/train/train-{{0..1}}.tar", size=20, num_classes=3,
        test_urls=f"{tmp_path}/test/train-{{0..3}}.tar", test_size=test_size)
    assert len(data.prepare(src(40), tmp_path / "cache").index("test")) == 40
    with pytest.raises(DataError, match=r"declares test_size 41, but its test split's 4 shards \(.*\) hold 40 "
                                        r"readable samples; declare test_size: 40 or fewer"):
        data.prepare(src(41), tmp_path / "cache")
    raw = Path(test[2]).read_bytes()
    Path(test[2]).write_bytes(raw[:len(raw) // 2])
    with pytest.raises(DataError, match=r"indexing webdataset \(test\): \d+ of 40 samples unreadable .*truncated_tar"):
        data.prepare(src(), tmp_path / "cache")
    assert 20 < len(data.prepare(src(), tmp_path / "cache", max_bad_fraction=0.5).index("test")) < 40

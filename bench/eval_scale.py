"""Bytes read and seconds per evaluation kind on a large downstream task, one process and 2 gloo ranks.

    python bench/eval_scale.py [--size 200000] [--test-size 10000] [--classes 100] [--shards local|pipe|s3]

Writes a task of `--size` tiny real PNGs (8 px, a colour per class plus noise) in shards of 1,000, then measures
each evaluation kind as a trial runs it, with ViT-Pico/4 at 8 px (the model is not the point: the reads are):

- fewshot: 1/5/25-shot, one draw, the probe off (features of the union of the shot sets and the test split);
- probe: the linear probe (the whole train split and the test split);
- minival: one evaluation pass of the fine-tune minival (10% of the train split, a fixed slice read by offset);
- fig7: the 128 fixed images of the diagnostics (the first of the test split).

Where the shards are read from (`--shards`): `local` files, read by offset; `pipe` (`pipe:cat` URLs), streamed, as
any opaque stream is, so a sparse kind reads each shard up to its last wanted sample (the inherent cost of a
stream); `s3`, the shards and their sidecars uploaded to an S3 server on 127.0.0.1 (moto's, a dev dependency) and
read by byte-range requests. Bytes read are counted where the reader touches a shard (`ShardFiles.read`, by
offset or by range, and the bytes a streamed shard yields); bytes needed are the index's spans of the samples the
kind evaluates. Loader workers are off (`workers=0`), so every read happens in the counted
process. Goal (issue 23): bytes read / bytes needed <= 1.1 for every kind, at 1 and 2 ranks. Prints the ratios
last.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PER_SHARD, IMAGE, KINDS = 1000, 8, ("fewshot", "probe", "minival", "fig7")


def _write_shard(job: tuple) -> str:
    import numpy as np

    from pipelines.data.writer import write_shard

    path, split, start, stop, classes = job
    rng = np.random.default_rng([start, split == "test"])
    colours = np.random.default_rng(0).integers(0, 255, (classes, 3))

    def samples():
        for i in range(start, stop):
            label = i % classes
            noise = rng.integers(-20, 21, (IMAGE, IMAGE, 3))
            yield f"{split}{i:08d}", np.clip(colours[label] + noise, 0, 255).astype(np.uint8), label

    write_shard(Path(path), samples())
    return path


def make_task(root: Path, size: int, test_size: int, classes: int) -> dict[str, list[str]]:
    """PNG shards of the train and test splits (written once per shape, with their sidecars); their file names."""
    jobs = [(str(root / f"{split}-{start // PER_SHARD:06d}.tar"), split, start, min(start + PER_SHARD, n), classes)
            for split, n in (("train", size), ("test", test_size)) for start in range(0, n, PER_SHARD)]
    if not (root / "done").exists():
        root.mkdir(parents=True, exist_ok=True)
        with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            list(pool.map(_write_shard, jobs))
        (root / "done").write_text("")
    return {split: [Path(path).name for path, s, *_ in jobs if s == split] for split in ("train", "test")}


class Reads:
    """Bytes the reader takes from shards in this process (by offset, and from streams)."""

    def __init__(self):
        from pipelines.data import reader

        self.bytes = 0
        read, open_url = reader.ShardFiles.read, reader.open_url
        counter = self

        def counted_read(files, path, offset, size):
            out = read(files, path, offset, size)
            counter.bytes += len(out)
            return out

        class Counted:
            def __init__(self, stream):
                self.stream = stream

            def read(self, n=-1):
                out = self.stream.read(n)
                counter.bytes += len(out)
                return out

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.stream.close()

            def close(self):
                self.stream.close()

        reader.ShardFiles.read = counted_read
        reader.open_url = lambda url: Counted(open_url(url))


def _needed(kind: str, task, cache: Path) -> int:
    """Bytes of the samples `kind` evaluates (their index spans)."""
    import numpy as np

    from pipelines import downstream, fewshot, finetune

    train, test = downstream.task_splits(task, cache)

    def span(subset) -> int:
        return int(np.asarray(subset.index.size, dtype=np.int64)[subset.positions].sum())

    if kind == "fewshot":
        rows = fewshot.needed_rows(fewshot.draws(train.labels, _evaluate(kind).fewshot, 0))
        return span(train.part(rows)) + span(test)
    if kind == "probe":
        return span(train) + span(test)
    if kind == "minival":
        return span(finetune.split_minival(train, 0.1, 0)[1])
    return span(test.part(slice(0, 128)))


def _evaluate(kind: str):
    from pipelines.downstream import EvaluateConfig
    from pipelines.fewshot import FewshotConfig
    from pipelines.linear_probe import LinearProbeConfig

    off = {"fewshot": None, "linear_probe": None, "finetune": None, "diagnostics": None}
    if kind == "fewshot":
        return EvaluateConfig(**off | {"fewshot": FewshotConfig(shots=(1, 5, 25), repeats=1)})
    return EvaluateConfig(**off | {"linear_probe": LinearProbeConfig(l2_grid=(1e-3,), max_iter=20)})


def measure(rank: int, world: int, port: int, kind: str, fields: dict, cache: str, out: str) -> None:
    """One kind on this rank: its bytes read and seconds, written to `out` (rank 0 adds the bytes needed)."""
    import torch
    import torch.distributed as dist

    from pipelines import downstream, finetune, metrics, models
    from pipelines.data import SourceConfig, prepared
    from pipelines.data.stream import LoaderConfig
    from pipelines.runtime import Runtime

    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    task, cache_dir = SourceConfig(**fields), Path(cache)
    runtime = Runtime(torch.device("cpu"), cache_dir=cache_dir, loader=LoaderConfig(workers=0), progress=False)
    torch.manual_seed(0)
    model = models.build("ViT-Pico/4", task.num_classes, IMAGE)
    source = prepared(task, cache_dir)
    pretrained = downstream.Pretrained("ViT-Pico/4", model, model.state_dict(), IMAGE, source)
    reads = Reads()
    start = time.perf_counter()
    if kind in ("fewshot", "probe"):
        downstream.run(_evaluate(kind), pretrained, (task,), runtime)
    elif kind == "minival":
        train, _ = downstream.task_splits(task, cache_dir)
        metrics.evaluate(model, finetune.split_minival(train, 0.1, 0)[1], IMAGE, runtime.device)
    elif rank == 0:  # fig7: once, on the main rank
        downstream.Inputs("diagnostics", "pretrain", None, pretrained, runtime).pretrain_images(128)
    seconds = time.perf_counter() - start
    Path(f"{out}.{rank}").write_text(json.dumps({"bytes": reads.bytes, "seconds": seconds}))
    if rank == 0:
        Path(f"{out}.needed").write_text(str(_needed(kind, task, cache_dir)))
    if world > 1:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def s3_server(shards: Path) -> tuple[subprocess.Popen, str, str]:
    """moto's S3 server on 127.0.0.1 holding the shards (and sidecars) of `shards` in bucket `evalscale`, fake
    credentials in this process's environment (the ranks inherit it); (the server, the URL prefix and suffix of the
    shards)."""
    import pyarrow.fs as pafs

    moto = shutil.which("moto_server", path=os.path.dirname(sys.executable))
    if moto is None:
        raise SystemExit("--shards s3 needs moto's server (a dev dependency): pip install -e '.[dev]'")
    port = _free_port()
    server = subprocess.Popen([moto, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    query = f"?endpoint_override=127.0.0.1:{port}&scheme=http"
    fs, _ = pafs.FileSystem.from_uri(f"s3://evalscale{query}&allow_bucket_creation=true")
    fs.create_dir("evalscale")
    pafs.copy_files(str(shards), "evalscale/shards", destination_filesystem=fs, use_threads=True)
    return server, "s3://evalscale/shards/", query


def main() -> None:
    import torch.multiprocessing as mp

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=200_000, help="training images of the task")
    parser.add_argument("--test-size", type=int, default=10_000)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--shards", choices=("local", "pipe", "s3"), default="local",
                        help="read the shards as local files (by offset), pipe:cat URLs (streamed) or from an S3 "
                             "server (by byte range)")
    parser.add_argument("--root", default=None, help="where the shards go (default: a temp folder, kept per shape)")
    args = parser.parse_args()
    tag = f"evalscale-{args.size}-{args.test_size}-{args.classes}"
    root = Path(args.root or tempfile.gettempdir()) / tag
    root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    names = make_task(root / "shards", args.size, args.test_size, args.classes)
    server, prefix, suffix = None, f"{root / 'shards'}/", ""
    if args.shards == "pipe":
        prefix = "pipe:cat " + prefix
    elif args.shards == "s3":
        server, prefix, suffix = s3_server(root / "shards")
    try:
        urls = {split: ";".join(prefix + name + suffix for name in files) for split, files in names.items()}
        fields = {"source": "webdataset", "name": "tiny-png", "size": args.size, "test_size": args.test_size,
                  "image_size": IMAGE, "num_classes": args.classes, "urls": urls["train"], "test_urls": urls["test"]}
        cache = root / f"cache-{args.shards}"
        from pipelines.data import SourceConfig, prepare

        prepare(SourceConfig(**fields), cache, progress=False)
        print(f"task: {args.size:,} + {args.test_size:,} PNGs ({args.shards} shards), ready in "
              f"{time.perf_counter() - start:.0f} s", flush=True)
        ratios = {}
        for world in (1, 2):
            for kind in KINDS:
                ratios[(kind, world)] = _run(kind, world, fields, cache, str(root / f"{kind}-{world}"), mp)
        print(f"bytes read / bytes needed ({args.shards} shards; goal <= 1.1): " +
              ", ".join(f"{kind} x{world} {ratio:.3f}" for (kind, world), ratio in ratios.items()))
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)


def _run(kind: str, world: int, fields: dict, cache: Path, out: str, mp) -> float:
    """Measure `kind` on `world` ranks, print its line; bytes read / bytes needed."""
    if world == 1:
        measure(0, 1, 0, kind, fields, str(cache), out)
    else:
        mp.spawn(measure, args=(world, _free_port(), kind, fields, str(cache), out), nprocs=world, join=True)
    ranks = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(world)]
    read, needed = sum(r["bytes"] for r in ranks), int(Path(f"{out}.needed").read_text())
    per_rank = ", ".join(f"{r['bytes'] / 1e6:.2f}" for r in ranks)
    print(f"{kind:8s} ranks={world}: read {read / 1e6:8.2f} MB of {needed / 1e6:8.2f} MB needed "
          f"(per rank {per_rank} MB), {max(r['seconds'] for r in ranks):7.1f} s", flush=True)
    return read / needed


if __name__ == "__main__":
    main()

"""Data-parallel scaling: pretraining images/s of 2 DDP workers (gloo, 1 thread each) against 1 worker (1 thread)
on the same global batch, in the same run.

    python bench/ddp_scaling.py [--model ViT-Pico/4] [--batch 64] [--steps 60] [--rounds 3]

Each worker is a process running `pipelines.pretrain.run` (the study's training loop: DDP, no_sync micro-batches
where asked, metrics summed over ranks) on the same images, written once as tiny PNG shards and read through the
production loader without DataLoader worker processes: each rank decodes and augments its part of every batch
itself, so every process has one thread for everything, and decoding small PNGs is a small share of a step. The
steady-state rate is the loop's own (`perf.throughput`, its first steps left out). Rounds alternate the order of
the two set-ups; min / median / max over rounds are printed. Goal (issue 11): >= 1.6x on a 2-core machine.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipelines import pretrain
from pipelines.data.augment import Augment
from pipelines.data.index import ShardSubset, SourceIndex
from pipelines.data.scan import build
from pipelines.data.stream import LoaderConfig
from pipelines.data.writer import write_shard
from pipelines.runtime import Runtime


def write_shards(args: argparse.Namespace, folder: Path, per_shard: int = 64) -> Path:
    """`args.batch * 8` random images as PNG shards under `folder`, indexed there; returns the index folder."""
    rng = np.random.default_rng(0)
    n = args.batch * 8
    images, labels = rng.integers(0, 255, (n, args.size, args.size, 3), dtype=np.uint8), rng.integers(0, 10, n)
    paths = []
    for s, lo in enumerate(range(0, n, per_shard)):
        paths.append(str(folder / f"train-{s:06d}.tar"))
        rows = range(lo, min(lo + per_shard, n))
        write_shard(Path(paths[-1]), ((f"{i:06d}", images[i], int(labels[i])) for i in rows))
    build(paths, folder / "index", workers=1)
    return folder / "index"


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, index: str, out: str) -> None:
    torch.set_num_threads(1)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    source = SourceIndex(Path(index))
    data = ShardSubset(source, np.arange(len(source), dtype=np.int64))
    cfg = pretrain.PretrainConfig(steps=args.steps, batch_size=args.batch, precision="fp32", compile=False,
                                  augment=Augment(crop="translate", crop_padding=2, flip=True))
    rt = Runtime(torch.device("cpu"), loader=LoaderConfig(workers=0), progress=False)
    result = pretrain.run(cfg, args.model, data, 10, args.size, rt)
    if rank == 0:
        Path(out).write_text(str(result.throughput["images_per_s"]))
    if world > 1:
        dist.destroy_process_group()


def images_per_s(world: int, args: argparse.Namespace, index: Path) -> float:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "rate")
        mp.spawn(_worker, args=(world, port, args, str(index), out), nprocs=world, join=True)
        return float(Path(out).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-Pico/4")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=64, help="global batch (each of 2 workers takes half)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"{args.model} at {args.size} px, global batch {args.batch}, {args.steps} steps, {os.cpu_count()} cores")
    rates: dict[int, list[float]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as shards:
        index = write_shards(args, Path(shards))
        for r in range(args.rounds):
            for world in ((1, 2) if r % 2 == 0 else (2, 1)):
                rates[world].append(images_per_s(world, args, index))
                print(f"round {r}: {world} worker(s): {rates[world][-1]:.1f} images/s", flush=True)
    for world, got in rates.items():
        print(f"{world} worker(s): min {min(got):.1f} / median {statistics.median(got):.1f} / max {max(got):.1f} "
              "images/s")
    ratios = [b / a for a, b in zip(rates[1], rates[2], strict=True)]
    print(f"2 workers vs 1 (per round): min {min(ratios):.2f}x / median {statistics.median(ratios):.2f}x / max "
          f"{max(ratios):.2f}x")
    print(f"ratio (2 DDP workers / 1 worker, median images/s): "
          f"{statistics.median(rates[2]) / statistics.median(rates[1]):.2f}x")


if __name__ == "__main__":
    main()

"""Data loading throughput: our shard stream vs torchvision ImageFolder + DataLoader, same JPEGs, same run.

    python bench/data_throughput.py [--images 1536] [--workers 2] [--sizes 32 224]

Both loaders read the same JPEG bytes (the folder, and shards written from it by `pipelines.data.shards`) and
apply the same training transform: inception crop (5-100% area, aspect 3/4-4/3) + random flip, to uint8
[B, S, S, 3] batches. Baseline: `ImageFolder` with `RandomResizedCrop(S, scale=(0.05, 1))`,
`RandomHorizontalFlip`, `PILToTensor` (uint8 too, so neither side pays for float conversion), shuffled.
For reference it also times the common float variant (`ToTensor` + `Normalize`). The images are ImageNet-like:
smooth content with texture, 400-500 x 300-400 px, JPEG quality 90.

Then the stall measurement: the default study's first trial (configs/scaling.yaml, its loader settings, one
torch thread as in a trial), and the share of step time spent waiting for the loader.

Goal (issue 4): >= 1.5x ImageFolder at 224 px; <= 5% stall. Prints the 224-px ratio last.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipelines import data, pretrain
from pipelines.data.augment import Augment
from pipelines.data.shards import folder_to_shards, index_shards
from pipelines.data.stream import ShardStream, ShardSubset, StreamLoader

ROOT = Path(__file__).resolve().parents[1]


def make_folder(root: Path, n: int, classes: int = 10) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        w, h = int(rng.integers(400, 501)), int(rng.integers(300, 401))
        base = Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        pixels = np.asarray(base, dtype=np.int16) + rng.integers(-12, 13, (h, w, 3))
        folder = root / f"class{i % classes:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{i:06d}.jpg", quality=90)


def images_per_s(batches, n: int) -> float:
    """Images per second over `n` images, after the first batch (worker start-up) is excluded."""
    it = iter(batches)
    first = next(it)
    seen, start = 0, time.perf_counter()
    size = len(first[1]) if isinstance(first, list | tuple) else len(first.labels)
    while seen < n - size:
        batch = next(it)
        seen += len(batch[1]) if isinstance(batch, list | tuple) else len(batch.labels)
    return seen / (time.perf_counter() - start)


def ours(shards: list[str], size: int, batch: int, workers: int, n: int) -> float:
    stream = ShardStream(index_shards(shards), None, size, batch, Augment(crop="inception", flip=True), seed=0)
    return images_per_s(StreamLoader(stream, workers).batches(), n)


def image_folder(root: Path, size: int, batch: int, workers: int, n: int, as_float: bool) -> float:
    from torchvision import datasets, transforms

    tail = [transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3)] if as_float else [
        transforms.PILToTensor()]
    transform = transforms.Compose([transforms.RandomResizedCrop(size, scale=(0.05, 1.0)),
                                    transforms.RandomHorizontalFlip(), *tail])
    loader = torch.utils.data.DataLoader(datasets.ImageFolder(str(root), transform), batch_size=batch,
                                         shuffle=True, num_workers=workers, drop_last=True,
                                         persistent_workers=workers > 0)
    return images_per_s(_repeat(loader), n)


def _repeat(loader):
    while True:
        yield from loader


def default_study_stall(steps: int) -> float:
    """Loader wait / wall time over `steps` pretraining steps of the default study's first grid point."""
    from study.config import load_study

    cfg = load_study(ROOT / "configs" / "scaling.yaml")
    src = cfg.data.pretrain
    torch.set_num_threads(int(cfg.resources.cpus_per_worker))
    shards = data.prepare(src, cfg.cache_dir)["train"]
    index = data.source_index(src, shards)
    subset = ShardSubset(index, data.nested_subset(index.all_keys, cfg.data.subsets[0], 0))
    run_cfg = dataclasses.replace(cfg.pretrain, examples=None, steps=steps, checkpoint_every=0)
    fractions = []
    pretrain.run(run_cfg, cfg.models[0], subset, src.num_classes, src.image_size, 0, torch.device("cpu"),
                 on_epoch=lambda m: fractions.append(m["loader_wait_fraction"]), progress=False,
                 loader=cfg.data.loader)
    per_epoch = ", ".join(f"{100 * f:.1f}%" for f in fractions)
    print(f"default study ({cfg.models[0]}, {cfg.data.subsets[0]:,} images, batch {cfg.pretrain.batch_size}, "
          f"{cfg.data.loader.workers} loader worker(s)): loader stall per epoch {per_epoch}")
    return float(np.mean(fractions[1:] or fractions))  # the first epoch includes worker start-up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1536)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 224])
    parser.add_argument("--stall-steps", type=int, default=256)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder, wds = Path(tmp) / "folder", Path(tmp) / "wds"
        start = time.perf_counter()
        make_folder(folder, args.images)
        info = folder_to_shards(str(folder), wds, shard_size=256, progress=False)
        shards = [str(wds / name) for name in info["splits"]["train"]["filenames"]]
        mb = sum(os.path.getsize(s) for s in shards) / 2**20
        print(f"{args.images:,} JPEGs ({mb:.0f} MiB) in {len(shards)} shards, made in "
              f"{time.perf_counter() - start:.0f} s; {args.workers} workers, batch {args.batch}")
        ratios = {}
        for size in args.sizes:
            n = args.images - args.batch
            base = image_folder(folder, size, args.batch, args.workers, n, as_float=False)
            base_float = image_folder(folder, size, args.batch, args.workers, n, as_float=True)
            our = ours(shards, size, args.batch, args.workers, n)
            per_core = max(args.workers, 1)
            ratios[size] = our / base
            print(f"{size:>4} px: ours {our:7.0f} img/s ({our / per_core:6.0f}/core) | ImageFolder uint8 {base:7.0f} "
                  f"({base / per_core:6.0f}/core) | ImageFolder float {base_float:7.0f} | "
                  f"ratio {our / base:.2f}x (vs float {our / base_float:.2f}x)")
    stall = default_study_stall(args.stall_steps)
    print(f"default-study loader stall: {100 * stall:.1f}% of step time (goal <= 5%)")
    for size, ratio in ratios.items():
        print(f"ratio ours / ImageFolder at {size} px: {ratio:.2f}x" + (" (goal >= 1.5x)" if size == 224 else ""))


if __name__ == "__main__":
    main()

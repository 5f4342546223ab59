"""Data loading throughput: our shard stream vs torchvision ImageFolder + DataLoader, same JPEGs, same run.

    python bench/data_throughput.py [--images 1536] [--workers 2] [--sizes 32 224] [--rounds 3] [--stall-steps 256]

Both loaders read the same JPEG bytes (the folder, and shards written from it by `pipelines.data.folder`) and
apply the same training transform: inception crop (5-100% area, aspect 3/4-4/3) + random flip, to uint8
[B, S, S, 3] batches, with the same number of DataLoader workers. Baseline: `ImageFolder` with
`RandomResizedCrop(S, scale=(0.05, 1))`, `RandomHorizontalFlip`, `PILToTensor` (uint8 too, so neither side pays
for float conversion), shuffled. The images are ImageNet-like: smooth content with texture, 400-500 x 300-400 px,
JPEG quality 90.

Beside them, the decode-only upper bounds through the same DataLoader and workers: the JPEGs only decoded (no crop,
resize or batch), whole by PIL (what ImageFolder decodes), and as our loader decodes each crop
(`augment.decode_jpeg_region`: libjpeg-turbo at the DCT scale that covers the crop, 1/8 at 32 px, mostly full scale
at 224 px, and only down to the crop's bottom edge). Rounds alternate the order of the loaders (A B, B A, ...) so
drift on shared cores hits both; each line gives min / median / max over the rounds, and the ratio is per round.

Each size also prints what one loader worker (one CPU) feeds, 1000 / our CPU ms per image: the figure the dry run's
loader bound takes (`LOADER_IMAGES_PER_S` in study/cost.py; measure with `--workers 1`).

Then the stall measurement (skip it with --stall-steps 0): the default study's first trial (configs/scaling.yaml,
its loader settings, one torch thread as in a trial), and the share of step time spent waiting for the loader.

Goal (issue 14): >= 1.5x ImageFolder at 224 px; <= 5% stall. Prints the 224-px ratio last.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipelines import data, pretrain
from pipelines.data.augment import Augment, decode_jpeg_region, inception_box, jpeg_frame
from pipelines.data.folder import folder_to_shards
from pipelines.data.index import ShardSubset, scratch_index
from pipelines.data.stream import ShardStream, StreamLoader
from pipelines.loop import Hooks
from pipelines.runtime import Runtime

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


@dataclass
class Rate:
    images_per_s: float
    cpu_ms: float  # CPU time per image, this process and its loader workers together: robust to shared cores


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and its live children (the DataLoader workers), from /proc."""
    tick, total, me = os.sysconf("SC_CLK_TCK"), 0, str(os.getpid())
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if pid == me or fields[1] == me:  # fields[1]: the parent's pid
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick


def images_per_s(batches, n: int) -> Rate:
    """Images per second, and CPU time per image, over `n` images after the first batch (worker start-up)."""
    it = iter(batches)
    first = next(it)
    seen, start, cpu = 0, time.perf_counter(), _cpu_seconds()
    size = len(first[1]) if isinstance(first, list | tuple) else len(first.labels)
    while seen < n - size:
        batch = next(it)
        seen += len(batch[1]) if isinstance(batch, list | tuple) else len(batch.labels)
    return Rate(seen / (time.perf_counter() - start), 1e3 * (_cpu_seconds() - cpu) / seen)


def ours(shards: list[str], size: int, batch: int, workers: int, n: int) -> Rate:
    index = scratch_index(shards)
    whole = ShardSubset(index, np.arange(len(index), dtype=np.int64))
    stream = ShardStream(whole, size, batch, Augment(crop="inception", flip=True), seed=0)
    return images_per_s(StreamLoader(stream, workers).batches(), n)


def image_folder(root: Path, size: int, batch: int, workers: int, n: int) -> Rate:
    from torchvision import datasets, transforms

    transform = transforms.Compose([transforms.RandomResizedCrop(size, scale=(0.05, 1.0)),
                                    transforms.RandomHorizontalFlip(), transforms.PILToTensor()])
    loader = torch.utils.data.DataLoader(datasets.ImageFolder(str(root), transform), batch_size=batch,
                                         shuffle=True, num_workers=workers, drop_last=True,
                                         persistent_workers=workers > 0)
    return images_per_s(_repeat(loader), n)


class DecodeOnly(torch.utils.data.Dataset):
    """The folder's JPEGs, only decoded: whole by PIL (`size` None: what ImageFolder decodes), or as our loader
    decodes an inception crop of each at `size` (the same box draws; `augment.decode_jpeg_region`: the DCT scale
    that covers the crop, rows down to the crop's bottom)."""

    def __init__(self, root: Path, size: int | None):
        self.files, self.size = sorted(root.rglob("*.jpg")), size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[int, int]:
        if self.size is None:
            Image.open(self.files[i]).load()
        else:
            data = self.files[i].read_bytes()
            frame = jpeg_frame(data)
            box = inception_box(frame.width, frame.height, 0.05, np.random.default_rng([0, i]))
            decode_jpeg_region(data, frame, box, self.size)
        return 0, 0  # (image, label) as ImageFolder's, without pixels to send


def decode_only(root: Path, size: int | None, batch: int, workers: int, n: int) -> Rate:
    loader = torch.utils.data.DataLoader(DecodeOnly(root, size), batch_size=batch, shuffle=True,
                                         num_workers=workers, drop_last=True, persistent_workers=workers > 0)
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
    subset = data.nested_subset(data.prepare(src, cfg.cache_dir).index(), cfg.data.subsets[0], 0)
    run_cfg = dataclasses.replace(cfg.pretrain, examples=None, steps=steps, checkpoint_every=0)
    fractions = []
    rt = Runtime(torch.device("cpu"), loader=cfg.data.loader, progress=False)
    pretrain.run(run_cfg, cfg.models[0], subset, src.num_classes, src.image_size, rt,
                 Hooks(on_epoch=lambda record: fractions.append(record.loader_wait_fraction)))
    per_epoch = ", ".join(f"{100 * f:.1f}%" for f in fractions)
    print(f"default study ({cfg.models[0]}, {cfg.data.subsets[0]:,} images, batch {cfg.pretrain.batch_size}, "
          f"{cfg.data.loader.workers} loader worker(s)): loader stall per epoch {per_epoch}")
    return float(np.mean(fractions[1:] or fractions))  # the first epoch includes worker start-up


def compare(folder: Path, shards: list[str], size: int, args) -> list[float]:
    """Alternating rounds of our loader vs ImageFolder (and the decode-only bounds); prints min / median."""
    n = args.images - args.batch
    runs = {"ours": lambda: ours(shards, size, args.batch, args.workers, n),
            "ImageFolder": lambda: image_folder(folder, size, args.batch, args.workers, n),
            "decode only, whole": lambda: decode_only(folder, None, args.batch, args.workers, n),
            "decode only, ours": lambda: decode_only(folder, size, args.batch, args.workers, n)}
    rates: dict[str, list[Rate]] = {name: [] for name in runs}
    for r in range(args.rounds):
        for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            rates[name].append(runs[name]())
    ratios = [a.images_per_s / b.images_per_s for a, b in zip(rates["ours"], rates["ImageFolder"], strict=True)]
    cpu_ratios = [b.cpu_ms / a.cpu_ms for a, b in zip(rates["ours"], rates["ImageFolder"], strict=True)]
    print(f"{size} px, min / median / max of {args.rounds} rounds (img/s; CPU ms per image, all processes):")
    for name, v in rates.items():
        speed, cpu = [x.images_per_s for x in v], [x.cpu_ms for x in v]
        print(f"  {name:<20} {min(speed):6.0f} / {np.median(speed):6.0f} / {max(speed):6.0f} img/s | "
              f"{min(cpu):5.2f} / {np.median(cpu):5.2f} / {max(cpu):5.2f} CPU ms/img")
    print(f"  ratio ours / ImageFolder: {min(ratios):.2f} / {np.median(ratios):.2f} / {max(ratios):.2f}x in img/s "
          f"(per round: {', '.join(f'{x:.2f}' for x in ratios)}); {min(cpu_ratios):.2f} / "
          f"{np.median(cpu_ratios):.2f} / {max(cpu_ratios):.2f}x in CPU per image", flush=True)
    # What one loader worker (one CPU) feeds: robust to shared cores, unlike img/s (the dry run's LOADER_IMAGES_PER_S)
    print(f"  one loader worker feeds ~{1e3 / np.median([x.cpu_ms for x in rates['ours']]):.0f} img/s at {size} px "
          f"(1000 / median CPU ms per image of ours, this process included)", flush=True)
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1536)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 224])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--stall-steps", type=int, default=256, help="0: skip the default study's stall")
    args = parser.parse_args()
    ratios = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder, wds = Path(tmp) / "folder", Path(tmp) / "wds"
        start = time.perf_counter()
        make_folder(folder, args.images)
        info = folder_to_shards(str(folder), wds, shard_size=256, progress=False)
        shards = [str(wds / name) for name in info["splits"]["train"]["filenames"]]
        mb = sum(os.path.getsize(s) for s in shards) / 2**20
        print(f"{args.images:,} JPEGs ({mb:.0f} MiB) in {len(shards)} shards, made in "
              f"{time.perf_counter() - start:.0f} s; {args.workers} workers, batch {args.batch}", flush=True)
        for size in args.sizes:
            ratios[size] = compare(folder, shards, size, args)
    if args.stall_steps:
        stall = default_study_stall(args.stall_steps)
        print(f"default-study loader stall: {100 * stall:.1f}% of step time (goal <= 5%)")
    for size, per_round in ratios.items():
        print(f"ratio ours / ImageFolder at {size} px: min {min(per_round):.2f}x, median {np.median(per_round):.2f}x, "
              f"max {max(per_round):.2f}x" + (" (goal >= 1.5x)" if size == 224 else ""))


if __name__ == "__main__":
    main()

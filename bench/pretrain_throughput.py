"""Pretraining step throughput: our loop vs a timm `train.py`-style loop, same model, batch, data, precision.

    python bench/pretrain_throughput.py [--models ViT-Pico/4 BiT-R14-Pico] [--steps 15] [--rounds 5] [--compile]
        [--workers 0] [--images 4096]

Both loops train on the same uint8 images with the same augmentation (a random shift by up to 4 px, black
border). Ours reads them from tiny PNG shards through the production loader (`ShardStream` + `StreamLoader`, with
`--workers` DataLoader workers: 0 decodes and shifts them in the training process, as the baseline does its
part; more start their processes in every round); the baseline draws them from memory and shifts them with its
own few lines of tensor code (`shift`), so our side also pays for the PNG decoding. The baseline uses timm's own
optimizer/scheduler factories and gradient clipping (timm.optim.create_optimizer_v2,
timm.scheduler.create_scheduler_v2, timm.utils.dispatch_clip_grad) with train.py's defaults (no channels_last, no
compile), as timm's train_one_epoch does. The two run in alternating rounds of `--steps` steps (A B, then B A), so
a machine whose speed drifts (other processes on shared cores) slows both alike; the ratio is taken round by round
and its median printed. `--compile` also times our loop with torch.compile against our eager loop, and the compile.
Goal (issue 13): ratio >= 1.0 on CPU. Prints the ratio last.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import dispatch_clip_grad

from pipelines import models, perf
from pipelines.data.augment import Augment
from pipelines.data.index import ShardSubset
from pipelines.data.scan import build
from pipelines.data.stream import ShardStream, StreamLoader
from pipelines.data.writer import write_shard
from pipelines.loop import LoopSpec, to_input, train_loop, warmup_decay
from pipelines.pretrain import PretrainConfig, make_optimizer
from pipelines.runtime import Runtime

AUGMENT = Augment(crop="translate", crop_padding=4, flip=False)
CPU = torch.device("cpu")
Loop = Callable[[int], None]  # runs that many steps


def write_shards(images: np.ndarray, labels: np.ndarray, folder: Path, per_shard: int = 256) -> ShardSubset:
    """The images as PNG shards of `per_shard` samples under `folder`, indexed there: the whole split."""
    paths = []
    for s, lo in enumerate(range(0, len(images), per_shard)):
        paths.append(str(folder / f"train-{s:06d}.tar"))
        write_shard(Path(paths[-1]), ((f"{i:06d}", images[i], int(labels[i]))
                                      for i in range(lo, min(lo + per_shard, len(images)))))
    index = build(paths, folder / "index", workers=1)
    return ShardSubset(index, np.arange(len(index), dtype=np.int64))


def shift(x: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    """The baseline's augmentation, AUGMENT on a float batch [B, 3, S, S] in [-1, 1]: each image shifted by up to
    `pad` px, the border black (-1)."""
    size = x.shape[-1]
    padded = F.pad(x, (pad, pad, pad, pad), value=-1.0)
    offsets = torch.randint(0, 2 * pad + 1, (x.shape[0], 2), generator=gen).tolist()
    return torch.stack([padded[i, :, dy:dy + size, dx:dx + size] for i, (dy, dx) in enumerate(offsets)])


def ours(name: str, data: ShardSubset, batch: int, workers: int = 0, compile_model: bool = False) -> Loop:
    torch.manual_seed(0)
    model = models.build(name, 64, 32)
    perf.channels_last(model, CPU)
    optimizer = make_optimizer(PretrainConfig(steps=1, batch_size=batch), model, CPU)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(warmup_decay, total=10**6, warmup=10,
                                                                     decay="cosine"))
    if compile_model:
        perf.compile_model(model)
    batches = StreamLoader(ShardStream(data, 32, batch, AUGMENT, seed=0), workers)

    def run(steps: int) -> None:
        spec = LoopSpec(steps=steps, batch_size=batch, image_size=32, grad_clip=1.0)
        train_loop(model, batches, spec, optimizer, scheduler, Runtime(CPU, progress=False))

    return run


def timm_style(name: str, images: np.ndarray, labels: np.ndarray, batch: int) -> Loop:
    torch.manual_seed(0)
    model = models.build(name, 64, 32)
    optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.1)
    scheduler, _ = create_scheduler_v2(optimizer, "cosine", num_epochs=10**6, warmup_epochs=10,
                                       step_on_epochs=False, updates_per_epoch=1)
    loss_fn = torch.nn.CrossEntropyLoss()
    rng = np.random.default_rng(1)
    gen = torch.Generator().manual_seed(0)
    num_updates = 0

    def run(steps: int) -> None:
        nonlocal num_updates
        model.train()
        for _ in range(steps):
            idx = rng.integers(0, len(images), batch)
            x = shift(to_input(images[idx], 32, CPU), AUGMENT.crop_padding, gen)
            y = torch.from_numpy(labels[idx])
            loss = loss_fn(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            dispatch_clip_grad(model.parameters(), value=1.0, mode="norm")
            optimizer.step()
            num_updates += 1
            scheduler.step_update(num_updates=num_updates)

    return run


def rounds(a: Loop, b: Loop, steps: int, batch: int, n: int) -> tuple[list[float], list[float]]:
    """Images/s of `a` and `b` over `n` rounds of `steps` steps each, alternating which goes first."""
    a(2), b(2)  # warm-up: allocator, oneDNN primitives, compilation
    speeds: tuple[list[float], list[float]] = ([], [])
    for r in range(n):
        for i in ((0, 1) if r % 2 == 0 else (1, 0)):
            start = time.perf_counter()
            (a, b)[i](steps)
            speeds[i].append(steps * batch / (time.perf_counter() - start))
    return speeds


def summary(ratios: list[float]) -> str:
    return f"min {min(ratios):.2f} median {float(np.median(ratios)):.2f} max {max(ratios):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["ViT-Pico/4", "BiT-R14-Pico"])
    parser.add_argument("--steps", type=int, default=15, help="steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compile", action="store_true", help="also time our loop compiled vs eager")
    parser.add_argument("--workers", type=int, default=0, help="our loader's DataLoader workers")
    parser.add_argument("--images", type=int, default=4096)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 255, (args.images, 32, 32, 3), dtype=np.uint8), rng.integers(0, 64, args.images)
    with tempfile.TemporaryDirectory() as tmp:
        compare(args, write_shards(images, labels, Path(tmp)), images, labels)


def compare(args: argparse.Namespace, data: ShardSubset, images: np.ndarray, labels: np.ndarray) -> None:
    medians = []
    for name in args.models:
        if args.compile:
            start = time.perf_counter()
            compiled = ours(name, data, args.batch, args.workers, compile_model=True)
            compiled(1)
            cold = time.perf_counter() - start
            c, e = rounds(compiled, ours(name, data, args.batch, args.workers), args.steps, args.batch, args.rounds)
            ratios = [x / y for x, y in zip(c, e, strict=True)]
            print(f"{name}: compiled {np.median(c):.0f} img/s, eager {np.median(e):.0f} img/s, compile "
                  f"{cold:.0f} s, ratio compiled / eager {summary(ratios)}")
        a, b = rounds(ours(name, data, args.batch, args.workers), timm_style(name, images, labels, args.batch),
                      args.steps, args.batch, args.rounds)
        ratios = [x / y for x, y in zip(a, b, strict=True)]
        medians.append(float(np.median(ratios)))
        print(f"{name}: ours {np.median(a):.0f} img/s, timm train.py-style {np.median(b):.0f} img/s, "
              f"ratio per round {summary(ratios)}")
    print(f"throughput ratio ours / timm-style (geometric mean over {len(medians)} models of the median per-round "
          f"ratio): {float(np.exp(np.mean(np.log(medians)))):.2f}")


if __name__ == "__main__":
    main()

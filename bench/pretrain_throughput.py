"""Pretraining step throughput: our loop vs a timm `train.py`-style loop, same model, batch, data, precision.

    python bench/pretrain_throughput.py [--models ViT-Pico/4 BiT-R14-Pico] [--steps 60] [--batch 128]

Both loops read the same uint8 images in memory and apply the same conversion and augmentation; the baseline
uses timm's own optimizer/scheduler factories and gradient clipping (timm.optim.create_optimizer_v2,
timm.scheduler.create_scheduler_v2, timm.utils.dispatch_clip_grad), as timm's train_one_epoch does.
Goal (issue 3): ratio >= 1.0 on CPU. Prints the ratio last.
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import numpy as np
import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import dispatch_clip_grad

from pipelines import models
from pipelines.data import ImageArrays
from pipelines.data.augment import Augment, augment_batch
from pipelines.pretrain import PretrainConfig, make_optimizer
from pipelines.training import LoopSpec, MemoryBatches, to_input, train_loop, warmup_decay

AUGMENT = Augment(crop="translate", crop_padding=4, flip=False)


def ours(name: str, data: ImageArrays, steps: int, batch: int) -> float:
    torch.manual_seed(0)
    model = models.build(name, 64, 32)
    cfg = PretrainConfig(steps=steps, batch_size=batch)
    optimizer = make_optimizer(cfg, model, torch.device("cpu"))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(warmup_decay, total=steps, warmup=10,
                                                                     decay="cosine"))
    spec = LoopSpec(steps=steps, batch_size=batch, image_size=32, grad_clip=1.0)
    start = time.perf_counter()
    batches = MemoryBatches(data, batch, 0, AUGMENT)
    train_loop(model, batches, spec, optimizer, scheduler, torch.device("cpu"), progress=False)
    return steps * batch / (time.perf_counter() - start)


def timm_style(name: str, data: ImageArrays, steps: int, batch: int) -> float:
    torch.manual_seed(0)
    model = models.build(name, 64, 32)
    optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.1)
    scheduler, _ = create_scheduler_v2(optimizer, "cosine", num_epochs=steps, warmup_epochs=10, step_on_epochs=False,
                                       updates_per_epoch=1)
    loss_fn = torch.nn.CrossEntropyLoss()
    rng = np.random.default_rng(1)
    gen = torch.Generator().manual_seed(0)
    model.train()
    start = time.perf_counter()
    for num_updates in range(1, steps + 1):
        idx = rng.integers(0, len(data), batch)
        x = augment_batch(to_input(data.images[idx], 32, torch.device("cpu")), AUGMENT, gen)
        y = torch.from_numpy(data.labels[idx])
        loss = loss_fn(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        dispatch_clip_grad(model.parameters(), value=1.0, mode="norm")
        optimizer.step()
        scheduler.step_update(num_updates=num_updates)
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["ViT-Pico/4", "BiT-R14-Pico"])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    data = ImageArrays(rng.integers(0, 255, (4096, 32, 32, 3), dtype=np.uint8), rng.integers(0, 64, 4096))
    ratios = []
    for name in args.models:
        ours(name, data, 5, args.batch), timm_style(name, data, 5, args.batch)  # warm-up
        a, b = ours(name, data, args.steps, args.batch), timm_style(name, data, args.steps, args.batch)
        ratios.append(a / b)
        print(f"{name}: ours {a:.0f} img/s, timm train.py-style {b:.0f} img/s, ratio {a / b:.2f}")
    print(f"throughput ratio ours / timm-style (geometric mean over {len(ratios)} models): "
          f"{float(np.exp(np.mean(np.log(ratios)))):.2f}")


if __name__ == "__main__":
    main()

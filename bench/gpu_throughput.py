"""GPU pretraining throughput and MFU: our pretraining step vs timm's `train.py` loop, same model, same batch.

    python bench/gpu_throughput.py [--models ViT-B/16 BiT-R50x1] [--steps 30] [--batch N]

At 224 px in bf16, for each model: the largest batch (of a few candidates) that fits both loops, then images/s and
MFU (3 x forward FLOPs counted from the model, against the device's bf16 peak from pipelines/perf.py) of both.
Both read the same uint8 batch already on the GPU (no loader in the measurement). Ours is `loop.train_loop`
with the pretraining defaults on CUDA: bf16 autocast, torch.compile (regional for ViTs), channels_last for the
BiT, fused AdamW, clipping at norm 1, the loss read every `nonfinite_check_every` steps. The baseline is timm
train.py's `train_one_epoch` with `--amp --amp-dtype bfloat16 --torchcompile` (and `--channels-last` for the BiT):
timm's AdamW (foreach), no clipping, the loss read with `.item()` every step as train.py does when not distributed.
Goal (issue 13): ratio >= 1.0 and >= 40% MFU for ViT-B/16 on an H100. Without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from collections.abc import Iterator
from functools import partial

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

from pipelines import families, models, perf
from pipelines.data.stream import Batch
from pipelines.loop import LoopResult, LoopSpec, train_loop, warmup_decay
from pipelines.pretrain import PretrainConfig, make_optimizer
from pipelines.runtime import Runtime

SIZE, CLASSES, WARMUP = 224, 1000, 5


class DeviceBatches:
    """The same uint8 batch, already on the GPU, forever (a source for `train_loop`)."""

    augment = None

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def batches(self, start_epoch: int = 0, skip: int = 0) -> Iterator[Batch]:
        for _ in itertools.count():
            yield Batch(self.images, self.labels, [], 0, False)

    def skipped(self, epoch: int) -> dict[str, int]:
        return {}


def our_setup(name: str, device: torch.device, batch: int, size: int = SIZE, classes: int = CLASSES):
    """Model, optimizer and LR schedule of our pretraining at its defaults (as `pretrain.run` builds them)."""
    model = models.build(name, classes, size).to(device)
    perf.channels_last(model, device)
    optimizer = make_optimizer(PretrainConfig(steps=1, batch_size=batch), model, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(warmup_decay, total=10**6, warmup=100,
                                                                     decay="cosine"))
    return model, optimizer, scheduler


def ours(name: str, images: torch.Tensor, labels: torch.Tensor, steps: int, precision: str = "bf16",
         compiled: bool = True) -> LoopResult:
    """Our pretraining step on `images` (uint8 [B,S,S,3]) for `WARMUP + steps` steps; the result's timing is the
    steady state (as `pretrain.run` reports it), the first steps (compilation) left out."""
    size = images.shape[1]
    model, optimizer, scheduler = our_setup(name, images.device, len(images), size)
    if compiled:
        perf.compile_model(model)
    spec = LoopSpec(steps=WARMUP + steps, batch_size=len(images), image_size=size, grad_clip=1.0,
                    precision=precision)
    return train_loop(model, DeviceBatches(images, labels), spec, optimizer, scheduler,
                      Runtime(images.device, progress=False))


def timm_train_py(name: str, images: torch.Tensor, labels: torch.Tensor, steps: int) -> float:
    """Images/s of timm train.py's train_one_epoch (bf16 amp, torch.compile, channels_last for CNNs)."""
    device = images.device
    model = models.build(name, CLASSES, SIZE).to(device)
    conv = families.get(models.get_spec(name).family).convolutional
    if conv:
        model = model.to(memory_format=torch.channels_last)
    optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
    scheduler, _ = create_scheduler_v2(optimizer, "cosine", num_epochs=10**6, warmup_epochs=100,
                                       step_on_epochs=False, updates_per_epoch=1)
    model = torch.compile(model)
    loss_fn = torch.nn.CrossEntropyLoss()
    mean = torch.tensor([127.5] * 3, device=device).view(1, 3, 1, 1)  # PrefetchLoader: normalise on the GPU
    model.train()
    losses = []
    for num_updates in range(1, WARMUP + steps + 1):
        if num_updates == WARMUP + 1:
            torch.cuda.synchronize()
            start = time.perf_counter()
        x = images.permute(0, 3, 1, 2).float().sub_(mean).div_(mean)
        x = x.contiguous(memory_format=torch.channels_last if conv else torch.contiguous_format)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(model(x), labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())  # train.py: losses_m.update(loss.item() * accum_steps, ...) when not distributed
        optimizer.zero_grad()
        scheduler.step_update(num_updates=num_updates)
    torch.cuda.synchronize()
    return steps * len(images) / (time.perf_counter() - start)


def fits(name: str, batch: int, device: torch.device) -> bool:
    """Whether one eager bf16 training step of `name` at `batch` fits in the GPU's memory."""
    model = x = None
    try:
        model = models.build(name, CLASSES, SIZE).to(device)
        x = torch.randn(batch, 3, SIZE, SIZE, device=device)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model(x).float().logsumexp(-1).mean().backward()
        torch.optim.AdamW(model.parameters(), fused=True).step()
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        model = x = None
        torch.cuda.empty_cache()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["ViT-B/16", "BiT-R50x1"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=None, help="skip the search for the largest batch")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_throughput: skipped, no CUDA device")
        return 0
    device = torch.device("cuda")
    perf.enable_tf32(device)
    peak = perf.peak_flops(device, "bf16")
    print(f"device: {perf.device_name(device)}, bf16 peak {peak / 1e12:.0f} TFLOP/s (NaN: not in the table)")
    ratios = []
    for name in args.models:
        # 0.9 x the largest eager batch: headroom for the compiled graphs and the baseline's own buffers
        batch = args.batch or int(0.9 * next(b for b in (1024, 768, 512, 384, 256, 192, 128, 64, 32)
                                             if fits(name, b, device)))
        gen = torch.Generator(device=device).manual_seed(0)
        images = torch.randint(0, 256, (batch, SIZE, SIZE, 3), dtype=torch.uint8, device=device, generator=gen)
        labels = torch.randint(0, CLASSES, (batch,), device=device, generator=gen)
        flops = 3 * models.forward_flops(name, SIZE, CLASSES)
        result = ours(name, images, labels, args.steps)
        a = result.timed_steps * len(images) / result.timed_seconds
        torch.cuda.empty_cache()
        b = timm_train_py(name, images, labels, args.steps)
        torch.cuda.empty_cache()
        ratios.append(a / b)
        print(f"{name} batch {batch}: ours {a:.0f} img/s (MFU {flops * a / peak:.1%}), timm train.py "
              f"{b:.0f} img/s (MFU {flops * b / peak:.1%}), ratio {a / b:.2f}")
    print("ratio ours / timm train.py: " + ", ".join(f"{n} {r:.2f}" for n, r in zip(args.models, ratios, strict=True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

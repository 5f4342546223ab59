"""The device module: which device a trial runs on, how a step runs fast there, and how fast it ran: device
picking, precision and autocast, TF32, torch.compile, channels_last, fused optimizers; peak memory, device peak
FLOP/s and the model FLOPs utilisation (MFU) of a run.

The defaults are on for CUDA and off on a CPU (DESIGN-scale.md section 5), except channels_last for ResNet paths,
which also pays on a CPU (oneDNN: about 30% faster steps for the CPU-sized BiTs, bench/pretrain_throughput.py).
"""

from __future__ import annotations

import contextlib
import math
import re
import resource
import sys
from typing import Literal

import torch
from timm.models.resnetv2 import ResNetV2
from timm.models.vision_transformer import VisionTransformer
from torch import nn

Precision = Literal["auto", "fp32", "bf16", "fp16"]
BACKEND = "inductor"  # torch.compile backend; tests swap in "aot_eager" where only the plumbing is checked

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(gpus: float) -> torch.device:
    """CUDA when the trial was given GPUs (`resources.gpus_per_worker` > 0) and one is visible, else the CPU."""
    return torch.device("cuda") if gpus > 0 and torch.cuda.is_available() else torch.device("cpu")


def resolve_precision(setting: str, device: torch.device) -> str:
    """`auto` -> bf16 on a CUDA GPU with bf16 (Ampere and later), fp16 on older GPUs, fp32 elsewhere."""
    if setting != "auto":
        return setting
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed-precision region for forward passes (a resolved precision: fp32 means no autocast)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_DTYPES[precision])


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """Loss scaling for fp16 only (bf16 has fp32's exponent range); a disabled scaler passes calls through."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def enable_tf32(device: torch.device) -> None:
    """TF32 tensor cores for fp32 matmuls and convolutions on CUDA (10-bit mantissa products, fp32 sums)."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = True


def fused_optimizer(device: torch.device) -> bool:
    """Fused AdamW/SGD kernels: one launch for all parameters on CUDA; on a CPU fewer passes over memory."""
    return device.type in ("cuda", "cpu")


def channels_last(model: nn.Module, device: torch.device) -> torch.memory_format:
    """Put the model's ResNet paths (a BiT, a hybrid's backbone) in channels_last, in place; returns the memory
    format its input should have. A plain ViT stays as it is (its one convolution is the patch embedding)."""
    resnets = [m for m in model.modules() if isinstance(m, ResNetV2)]
    if not resnets or device.type not in ("cuda", "cpu"):
        return torch.contiguous_format
    for resnet in resnets:
        resnet.to(memory_format=torch.channels_last)
    return torch.channels_last


def compile_enabled(setting: bool | str, device: torch.device) -> bool:
    """`auto`: compile on CUDA only (on a CPU the cold start costs minutes and the CPU-sized models gain nothing
    measurable, see README)."""
    return device.type == "cuda" if setting == "auto" else bool(setting)


def compile_model(net: nn.Module) -> None:
    """torch.compile in place (`Module.compile`), so `state_dict()` keeps the plain module's keys. Static shapes
    (`dynamic=False`: a training batch never changes shape; `metrics.infer` pads its last batch). A ViT's blocks are
    compiled one by one (regional compilation: one graph reused by every block, a shorter cold start than the
    whole model), inside a DDP wrapper too. Any other model is compiled whole, and where `net` is a DDP wrapper it
    is the wrapper that is compiled (compile after the wrap, as PyTorch advises): dynamo then sees DDP's gradient
    buckets and splits the graph at their boundaries (`optimize_ddp`), so the all-reduce overlaps the backward."""
    from torch.nn.parallel import DistributedDataParallel

    model = net.module if isinstance(net, DistributedDataParallel) else net
    if isinstance(model, VisionTransformer):
        model.patch_embed.compile(dynamic=False, backend=BACKEND)
        for block in model.blocks:
            block.compile(dynamic=False, backend=BACKEND)
    else:
        net.compile(dynamic=False, backend=BACKEND)


def is_compiled(model: nn.Module) -> bool:
    """Some part of `model` runs compiled (`compile_model`)."""
    return any(getattr(m, "_compiled_call_impl", None) is not None for m in model.modules())


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict[str, float]:
    """`peak_device_memory_gb` (CUDA: most bytes allocated by tensors since the last reset) or, on a CPU,
    `peak_host_rss_gb` (the process's peak resident set since it started: an upper bound for one run)."""
    if device.type == "cuda":
        return {"peak_device_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9}
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return {"peak_host_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1e9}


# Dense peak FLOP/s per precision from the vendors' data sheets ("tf32" for fp32 matmuls on tensor cores).
# Most specific names first: a device name is matched against each pattern in order. Left out where no data
# sheet gives a dense tensor peak (A10G): its MFU is then not reported rather than guessed.
PEAK_FLOPS: list[tuple[str, dict[str, float]]] = [
    (r"H100.*PCIe", {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12, "fp32": 51.2e12}),
    (r"H100.*NVL|H200.*NVL", {"bf16": 835e12, "fp16": 835e12, "tf32": 418e12, "fp32": 60e12}),
    (r"H100|H200|GH200", {"bf16": 989e12, "fp16": 989e12, "tf32": 495e12, "fp32": 67e12}),  # SXM
    (r"A100", {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
    (r"L40S", {"bf16": 362e12, "fp16": 362e12, "tf32": 183e12, "fp32": 91.6e12}),
    (r"\bL4\b", {"bf16": 121e12, "fp16": 121e12, "tf32": 60e12, "fp32": 30.3e12}),
    (r"\bA10\b", {"bf16": 125e12, "fp16": 125e12, "tf32": 62.5e12, "fp32": 31.2e12}),
    (r"V100.*PCIe", {"fp16": 112e12, "fp32": 14e12}),
    (r"V100", {"fp16": 125e12, "fp32": 15.7e12}),
    (r"\bT4\b", {"fp16": 65e12, "fp32": 8.1e12}),
    (r"RTX 4090", {"bf16": 165e12, "fp16": 165e12, "tf32": 82.6e12, "fp32": 82.6e12}),
    (r"RTX 3090", {"bf16": 71e12, "fp16": 71e12, "tf32": 35.6e12, "fp32": 35.6e12}),
]


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def peak_flops(device: str | torch.device, precision: str) -> float:
    """Dense peak FLOP/s of `device` (a torch device or a CUDA device name) at a resolved precision; fp32 on CUDA
    counts the TF32 peak where the device has one (`enable_tf32`). NaN for a CPU or an unknown device."""
    name = device_name(device) if isinstance(device, torch.device) else device
    if name == "cpu":
        return math.nan
    for pattern, peaks in PEAK_FLOPS:
        if re.search(pattern, name):
            key = "tf32" if precision == "fp32" and "tf32" in peaks else precision
            return peaks.get(key, math.nan)
    return math.nan


def mfu(train_flops_per_image: float, images_per_s: float, devices: float, peak: float) -> float:
    """Model FLOPs utilisation per device: the FLOP/s that `images_per_s` (all devices together) take, over the
    peak of the `devices` devices (of one kind, `peak` FLOP/s each) that share them. Per device, so a point on N
    GPUs reads the same as on one at the same efficiency, and `--mfu` prices any grid with it."""
    return train_flops_per_image * images_per_s / (devices * peak)


def images_per_s_at(utilisation: float, train_flops_per_image: float, devices: float, peak: float) -> float:
    """The images per second (all devices together) that `devices` devices take at `utilisation` MFU (`mfu`'s
    inverse): what the data loader must feed to keep them busy."""
    return utilisation * devices * peak / train_flops_per_image


def throughput(images: int, seconds: float, waited: float, steps: int, train_flops_per_image: float,
               device: torch.device, precision: str, devices: int) -> dict[str, float]:
    """A run's throughput measurements (for MLflow: plain floats): `images` taken by all `devices` devices (the
    ranks of a process group, each on a `device` of one kind) in `seconds`. `images_per_s` is theirs together;
    `mfu` (per device) and `device_peak_tflops` only where the device's peak is known."""
    per_s = images / max(seconds, 1e-9)
    out = {"images_per_s": per_s, "step_time_s": seconds / max(steps, 1),
           "data_wait_fraction": waited / max(seconds, 1e-9), **peak_memory(device)}
    peak = peak_flops(device, precision)
    if math.isfinite(peak):
        out.update(mfu=mfu(train_flops_per_image, per_s, devices, peak), device_peak_tflops=peak / 1e12)
    return out

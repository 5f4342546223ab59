"""Pretraining stage: one model on one nested data subset, the paper's recipe as defaults."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file
from timm.models.resnetv2 import ResNetV2

from pipelines import models
from pipelines.data import ImageArrays
from pipelines.data.augment import Augment
from pipelines.data.stream import LoaderConfig, ShardStream, ShardSubset, StreamLoader
from pipelines.training import LoopSpec, MemoryBatches, duration_steps, train_loop, warmup_decay


@dataclass(frozen=True)
class PretrainConfig:
    """Defaults follow the ViT paper's pretraining set-up (Appendix B.1): Adam(W) with beta1 0.9,
    beta2 0.999, decoupled weight decay 0.1, linear warm-up then decay, gradient clipping at global norm 1."""

    epochs: float | None = None
    steps: int | None = None
    examples: int | None = None
    batch_size: int = 256
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.999
    warmup_steps: int = 200
    decay: Literal["cosine", "linear"] = "cosine"
    grad_clip: float = 1.0
    precision: Literal["fp32", "bf16"] = "fp32"
    loss: Literal["softmax", "sigmoid"] = "softmax"
    augment: Augment = field(default_factory=Augment)  # inception crop + flip, as the ViT paper pretrains
    compile: bool = False
    micro_batch_size: int | None = None  # accumulate gradients over micro-batches of this size
    checkpoint_every: int = 500  # steps between checkpoints (a trial restarted by Tune resumes from the newest)
    keep_checkpoints: int = 2

    def __post_init__(self):
        given = [v for v in (self.epochs, self.steps, self.examples) if v is not None]
        if len(given) != 1:
            raise ValueError("give exactly one duration: epochs, steps or examples")
        if any(v <= 0 for v in given) or self.batch_size <= 0 or self.lr <= 0:
            raise ValueError("durations, batch_size and lr must be positive")
        if self.micro_batch_size is not None and not 0 < self.micro_batch_size <= self.batch_size:
            raise ValueError("micro_batch_size must be in (0, batch_size]")

    def total_steps(self, dataset_size: int) -> int:
        return duration_steps(self.epochs, self.steps, self.examples, self.batch_size, dataset_size)

    def examples_seen(self, dataset_size: int) -> int:
        return self.total_steps(dataset_size) * self.batch_size


@dataclass
class PretrainResult:
    state_dict: dict[str, torch.Tensor]
    weights_path: Path | None
    steps: int
    examples_seen: int
    final: dict
    seconds: float


def make_optimizer(cfg: PretrainConfig, model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    # Weight decay on weights only, not on biases, norms, position embeddings or the class token.
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "pos_embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim > 1 and "pos_embed" not in n)]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")


def training_source(cfg: PretrainConfig, data: ImageArrays | ShardSubset, image_size: int, seed: int,
                    device: torch.device, loader: LoaderConfig) -> MemoryBatches | StreamLoader:
    """Batches for pretraining: streamed from shards by DataLoader workers, or drawn from a split in memory."""
    if isinstance(data, ImageArrays):
        return MemoryBatches(data, cfg.batch_size, seed, cfg.augment)
    stream = ShardStream(data.index, data.keys, image_size, cfg.batch_size, cfg.augment, seed, loader.shuffle_buffer)
    return StreamLoader(stream, loader.workers, loader.max_bad_fraction, pin_memory=device.type == "cuda")


def run(cfg: PretrainConfig, model_name: str, data: ImageArrays | ShardSubset, num_classes: int, image_size: int,
        seed: int, device: torch.device, out_dir: Path | None = None, on_epoch: Callable[[dict], None] | None = None,
        progress: bool = True, checkpoint_dir: Path | None = None,
        on_checkpoint: Callable[[Path], None] | None = None, loader: LoaderConfig | None = None) -> PretrainResult:
    """Pretrain `model_name` from scratch on `data` (resuming from `checkpoint_dir` if it holds a checkpoint);
    save the weights as safetensors in `out_dir`. `data` is a split in memory or a shard subset streamed with
    `loader`."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    model = models.build(model_name, num_classes, image_size).to(device)
    if isinstance(model, ResNetV2) and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    steps = cfg.total_steps(len(data))
    optimizer = make_optimizer(cfg, model, device)
    schedule = partial(warmup_decay, total=steps, warmup=cfg.warmup_steps, decay=cfg.decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    trained = torch.compile(model) if cfg.compile else model
    spec = LoopSpec(steps=steps, batch_size=cfg.batch_size, image_size=image_size, grad_clip=cfg.grad_clip,
                    loss=cfg.loss, precision=cfg.precision, seed=seed,
                    micro_batch_size=cfg.micro_batch_size, checkpoint_dir=checkpoint_dir,
                    checkpoint_every=cfg.checkpoint_every, keep_checkpoints=cfg.keep_checkpoints)
    source = training_source(cfg, data, image_size, seed, device, loader or LoaderConfig())
    final = train_loop(trained, source, spec, optimizer, scheduler, device, on_epoch, desc=f"pretrain {model_name}",
                       progress=progress, on_checkpoint=on_checkpoint)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    path = None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "pretrained.safetensors"
        save_file(state, str(path), metadata={"model": model_name, "steps": str(steps)})
    return PretrainResult(state, path, steps, steps * cfg.batch_size, final, time.perf_counter() - start)

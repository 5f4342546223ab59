"""Pretraining stage: one model on one nested data subset, the paper's recipe as defaults."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file

from pipelines import distributed, models, perf, selection
from pipelines.config import UserError
from pipelines.data.augment import Augment
from pipelines.data.index import SourceIndex
from pipelines.data.stream import ShardSubset, StreamLoader
from pipelines.loop import EpochRecord, Hooks, LoopSpec, duration_steps, streamed_batches, train_loop, warmup_decay
from pipelines.runtime import Runtime


@dataclass(frozen=True)
class PretrainConfig(models.ModelOptions):
    """Defaults follow the ViT paper's pretraining set-up (Appendix B.1): Adam(W) with beta1 0.9,
    beta2 0.999, decoupled weight decay 0.1 (torch's AdamW: scaled by the learning rate, as the paper's Flax Adam),
    linear warm-up then decay, gradient clipping at global norm 1. `optimizer: sgd` is the BiT paper's SGD: momentum
    0.9 with `weight_decay` as L2 on the gradient (coupled, torch's SGD).

    Its first fields are the model knobs (`models.ModelOptions`: dropout, drop_path, pool, pos_embed, pre_logits,
    zero_head, head_bias_init, weight_init), so a grid sets them beside the optimiser's, under `pretrain:` or a
    recipe."""

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
    precision: perf.Precision = "auto"  # auto: bf16 on CUDA (fp16 + loss scaling without bf16), fp32 on a CPU
    loss: Literal["softmax", "sigmoid"] = "softmax"
    label_smoothing: float = 0.0  # target (1 - e) y + e / classes, either loss (torch's CrossEntropyLoss for softmax)
    augment: Augment = field(default_factory=Augment)  # inception crop + flip, as the ViT paper pretrains
    compile: bool | Literal["auto"] = "auto"  # torch.compile; auto: on CUDA only
    micro_batch_size: int | None = None  # accumulate gradients over micro-batches of this size
    grad_checkpointing: bool = False  # recompute activations in the backward pass (timm): less memory, ~30% slower
    nonfinite_check_every: int = 25  # steps between host reads of the loss; a NaN/inf stops the run within these
    log_every: int = 50  # steps between training and system metrics and progress, a host read each (big_vision: 50)
    checkpoint_every: int = 500  # steps between checkpoints (a trial restarted by Tune resumes from the newest)
    keep_checkpoints: int = 2
    eval_every: int | None = None  # steps between evaluations during training (`pipelines.selection`); None: none
    eval_every_examples: int | None = None  # the same in examples (global batches rounded up), instead of steps
    select: Literal["best", "final"] = "best"  # with eval_every: whose weights the point keeps (without: the last)

    def __post_init__(self):
        named = {k: v for k, v in (("epochs", self.epochs), ("steps", self.steps), ("examples", self.examples))
                 if v is not None}
        if len(named) != 1:
            keep = [f"{', '.join(f'{other}: null' for other in named if other != kept)} keeps {kept}" for kept in named]
            fix = (f" ({' and '.join(named) if len(named) == 2 else 'all three'} are set: {'; '.join(keep)})"
                   if named else "")
            raise ValueError(f"give exactly one duration: epochs, steps or examples{fix}")
        bad = [f"{k} must be > 0 (got {v})" for k, v in (*named.items(), ("batch_size", self.batch_size),
                                                          ("lr", self.lr)) if v <= 0]
        if bad:
            raise ValueError("; ".join(bad))
        if self.micro_batch_size is not None and not 0 < self.micro_batch_size <= self.batch_size:
            raise ValueError("micro_batch_size must be in (0, batch_size]")
        if self.nonfinite_check_every <= 0 or self.log_every <= 0:
            raise ValueError("nonfinite_check_every and log_every must be positive")
        if self.eval_every is not None and self.eval_every_examples is not None:
            raise ValueError("give eval_every (steps) or eval_every_examples, not both")
        for name, unit in (("eval_every", "steps"), ("eval_every_examples", "examples")):
            if (value := getattr(self, name)) is not None and value <= 0:
                raise ValueError(f"{name} must be a positive number of {unit}, got {value}")
        for name in ("dropout", "drop_path", "label_smoothing"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")

    @property
    def selects_best(self) -> bool:
        """Keep the best measured step's weights (the paper's Fig 4 protocol) rather than the last's."""
        return self.eval_steps is not None and self.select == "best"

    @property
    def eval_steps(self) -> int | None:
        """Steps between evaluations during training (`eval_every`, or `eval_every_examples` in global batches,
        rounded up); None: no evaluation during training."""
        if self.eval_every_examples is None:
            return self.eval_every
        return duration_steps(None, None, self.eval_every_examples, self.batch_size, 0)

    def total_steps(self, dataset_size: int) -> int:
        return duration_steps(self.epochs, self.steps, self.examples, self.batch_size, dataset_size)


WEIGHTS_FILE = "pretrained.safetensors"  # what `run` names the weights in its caller's `out_dir`


@dataclass
class PretrainResult:
    state_dict: dict[str, torch.Tensor]  # the last step's weights
    weights_path: Path | None
    steps: int
    examples_seen: int
    final: EpochRecord | None  # the last epoch's record (None: resumed with no step left)
    seconds: float
    # Steady state of the run (`perf.throughput`): images_per_s, step_time_s, data_wait_fraction,
    # peak_device_memory_gb (CUDA) or peak_host_rss_gb (CPU), and mfu (per device), device_peak_tflops where the peak
    # is known. images_per_s counts every rank's images.
    throughput: dict[str, float] = field(default_factory=dict)
    # With `eval_every`: the step `select` chose (its weights too with `select: best`); None without, or when a
    # resumed run had no step left to measure.
    chosen: selection.Chosen | None = None

    @property
    def selected_state(self) -> dict[str, torch.Tensor]:
        """The weights the point keeps: the chosen step's where they were kept, else the last step's."""
        return self.chosen.state if self.chosen is not None and self.chosen.state is not None else self.state_dict


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Parameter groups: weight decay on weights only, not on what the model exempts (`no_weight_decay()`: a ViT's
    position embedding and class token) nor on any 1-D parameter (biases, norm scales)."""
    exempt = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name in exempt else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(cfg: PretrainConfig, model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    groups, fused = decay_groups(model, cfg.weight_decay), perf.fused_optimizer(device)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, fused=fused)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


def check_labels(loss: str, data: ShardSubset | SourceIndex, name: str = "the pretraining source") -> None:
    """Refuse `loss: softmax` on a multi-label source (whole source, not the subset, so the answer does not
    depend on the subset size): a softmax target would keep one of a sample's classes and silently drop the
    rest, and which one would be an accident of how the labels were written.

    Raises:
        UserError: one line, naming the fix (`pretrain.loss=sigmoid`).
    """
    width = (data.index if isinstance(data, ShardSubset) else data).label_width
    if loss == "softmax" and width > 1:
        raise UserError(f"{name} is multi-label (up to {width} classes per sample) but pretrain.loss is 'softmax', "
                        f"which takes one class per sample: set pretrain.loss=sigmoid")


def training_source(cfg: PretrainConfig, data: ShardSubset, image_size: int, rt: Runtime) -> StreamLoader:
    """This rank's batches for pretraining: streamed from shards, decoded and augmented by DataLoader workers."""
    distributed.ranks().share(cfg.batch_size, "pretrain.batch_size")
    return streamed_batches(data, image_size, cfg.batch_size, cfg.augment, rt)


def run(cfg: PretrainConfig, model_name: str, data: ShardSubset, num_classes: int, image_size: int, rt: Runtime,
        hooks: Hooks[EpochRecord] | None = None, out_dir: Path | None = None,
        probe: Callable[[torch.nn.Module, int], float] | None = None) -> PretrainResult:
    """Pretrain `model_name` from scratch on `data`, a shard subset streamed with `rt.loader`.

    Args:
        rt: device, seed, loader, progress and the stop poll (polled at step boundaries, it stops the run with a
            checkpoint: TrainingStopped).
        hooks: each epoch's `EpochRecord` and one every `cfg.log_every` steps, the checkpoint folder (resumed
            from if it holds a checkpoint) and each checkpoint written; the progress label (default:
            `pretrain <model>`).
        out_dir: where the weights are saved as safetensors (and the chosen step's, `selection.BEST_FILE`, with
            `select: best`); None: not saved.
        probe: measures the model every `cfg.eval_every` steps and at the end, returning the score `select: best`
            chooses on (`selection.Probe`); needed with `cfg.eval_every`.

    Run on every rank of a process group, it trains data-parallel (`cfg.batch_size` is global; rank 0 writes the
    checkpoints and the weights).
    """
    check_labels(cfg.loss, data)
    hooks = hooks or Hooks()
    device, start = rt.device, time.perf_counter()
    torch.manual_seed(rt.seed)
    perf.reset_peak_memory(device)
    options = models.ModelOptions.of(cfg)
    model = models.build(model_name, num_classes, image_size, options).to(device)
    perf.channels_last(model, device)
    model.set_grad_checkpointing(cfg.grad_checkpointing)
    steps = cfg.total_steps(len(data))
    optimizer = make_optimizer(cfg, model, device)
    schedule = partial(warmup_decay, total=steps, warmup=cfg.warmup_steps, decay=cfg.decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    precision = perf.resolve_precision(cfg.precision, device)
    spec = LoopSpec(steps=steps, batch_size=cfg.batch_size, image_size=image_size, grad_clip=cfg.grad_clip,
                    loss=cfg.loss, label_smoothing=cfg.label_smoothing, precision=precision,
                    micro_batch_size=cfg.micro_batch_size,
                    checkpoint_every=cfg.checkpoint_every, keep_checkpoints=cfg.keep_checkpoints,
                    nonfinite_check_every=cfg.nonfinite_check_every, log_every=cfg.log_every,
                    compile=perf.compile_enabled(cfg.compile, device), eval_every=cfg.eval_steps or 0)
    if cfg.eval_steps and probe is None:
        raise ValueError("pretrain.eval_every needs a probe to measure the model with")
    selector = selection.Selector(model, probe, cfg.selects_best) if cfg.eval_steps else None
    source = training_source(cfg, data, image_size, rt)
    loop = train_loop(model, source, spec, optimizer, scheduler, rt,
                      replace(hooks, label=hooks.label or f"pretrain {model_name}", select=selector))
    flops = 3 * models.forward_flops(model_name, image_size, num_classes, options)  # forward + backward (2x forward)
    throughput = perf.throughput(loop.timed_steps * cfg.batch_size, loop.timed_seconds, loop.waited_seconds,
                                 loop.timed_steps, flops, device, precision,
                                 distributed.ranks().world_size) if loop.timed_steps else {}
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    path = None
    if out_dir is not None and distributed.ranks().main:
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / WEIGHTS_FILE
        save_file(state, str(path), metadata={"model": model_name, "steps": str(steps)})
        if selector is not None and selector.keep_best and selector.best is not None:
            selection.save_chosen(selector.best, out_dir / selection.BEST_FILE)
    return PretrainResult(state, path, steps, steps * cfg.batch_size, loop.final, time.perf_counter() - start,
                          throughput, selector.chosen if selector is not None else None)

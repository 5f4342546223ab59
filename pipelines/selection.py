"""Evaluation during pretraining and the step whose weights a point keeps (the ViT paper's Fig 4 protocol: early
stopping, reporting the best score during training, so a small subset is not judged by an overfit last step).

Every `pretrain.eval_every` steps and at the end, `Probe` measures the current weights: upstream top-1 on the
source's test split (or, without one, the slice carved from it: `pipelines.data.held_out`) and few-shot on each
downstream task (the evaluation a study runs, on these weights), logged at the global step. `Selector` keeps the
step with the best few-shot headline (`select: best`) or the last (`final`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from pipelines import downstream, evaluations
from pipelines.data import SourceConfig
from pipelines.data.stream import ShardSubset
from pipelines.fewshot import FewshotConfig
from pipelines.metrics import evaluate
from pipelines.runtime import Runtime

BEST_FILE = "best.safetensors"  # the best step's weights: in each checkpoint folder, and beside the final weights
HEADLINE_SHOTS = 5  # the paper's Fig 4 reports 5-shot linear accuracy


def headline(found: list[downstream.Measurement], shots: tuple[int, ...], task: str) -> float:
    """The score a step is selected on: few-shot top-1 on the first downstream task `task`, 5-shot where the study
    measures it, else its largest shots."""
    k = headline_shots(shots)
    return next(m.value for m in found if m.dataset == task and m.shots == k and m.metric == "top1")


def headline_shots(shots: tuple[int, ...]) -> int:
    """The k a step is selected on: 5 where the study measures it, else its largest."""
    return HEADLINE_SHOTS if HEADLINE_SHOTS in shots else max(shots)


@dataclass(frozen=True)
class Probe:
    """What a point measures of its weights during pretraining; `on_curve(prefix, step, values)` hears each number
    at the global step, under `pretrain/val` and `pretrain/fewshot/<task>`."""

    fewshot: FewshotConfig
    tasks: tuple[SourceConfig, ...]
    val: ShardSubset  # the pretraining source's test split or held-out slice: fixed, and never trained on
    model_name: str
    image_size: int
    runtime: Runtime
    on_curve: Callable[[str, int, dict[str, float]], None] | None = None

    def __call__(self, model: nn.Module, step: int) -> float:
        """Measure `model` (on every rank of a process group) and return its headline score."""
        loader = self.runtime.loader
        val = evaluate(model, self.val, self.image_size, self.runtime.device, loader.max_bad_fraction)["top1"]
        only = downstream.EvaluateConfig(**{**dict.fromkeys(evaluations.names()), "fewshot": self.fewshot})
        pretrained = downstream.Pretrained(self.model_name, model, model.state_dict(), self.image_size)
        found = downstream.run(only, pretrained, self.tasks, self.runtime)
        if self.on_curve is not None:
            self.on_curve("pretrain/val", step, {"top1": val})
            for task in self.tasks:
                self.on_curve(f"pretrain/fewshot/{task.label}", step,
                              {f"{m.shots}shot_{m.metric}": m.value for m in found if m.dataset == task.label})
        return headline(found, self.fewshot.shots, self.tasks[0].label)


@dataclass(frozen=True)
class Chosen:
    """A measured step: its headline score, and its weights (on the CPU) where they are kept."""

    step: int
    score: float
    state: dict[str, torch.Tensor] | None = None


class Selector:
    """Measures `model` with `probe` at the steps the training loop calls it at, and keeps the best step's weights
    (`keep_best`; ties keep the earlier step) or notes the last. The best rides in every checkpoint (`save`, `load`),
    so a resumed run still chooses among all its steps."""

    def __init__(self, model: nn.Module, probe: Callable[[nn.Module, int], float], keep_best: bool):
        self.model, self.probe, self.keep_best = model, probe, keep_best
        self.best: Chosen | None = None
        self.last: Chosen | None = None

    def __call__(self, step: int) -> None:
        score = self.probe(self.model, step)
        self.last = Chosen(step, score)
        if self.keep_best and (self.best is None or score > self.best.score):
            self.best = Chosen(step, score, {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()})

    @property
    def chosen(self) -> Chosen | None:
        """The step whose weights the point keeps (None: nothing measured, a resumed run with no step left)."""
        return self.best if self.keep_best else self.last

    def save(self, folder: Path) -> None:
        """The best so far into a checkpoint `folder` (before its state file marks it complete)."""
        if self.keep_best and self.best is not None:
            save_chosen(self.best, folder / BEST_FILE)

    def load(self, folder: Path) -> None:
        """The best so far from the checkpoint `folder` a run resumes from."""
        if self.keep_best and (folder / BEST_FILE).exists():
            self.best = load_chosen(folder / BEST_FILE)


def save_chosen(chosen: Chosen, path: Path) -> None:
    """`chosen`'s weights as safetensors, its step and score in the metadata."""
    save_file(chosen.state, str(path), metadata={"step": str(chosen.step), "score": repr(chosen.score)})


def load_chosen(path: Path) -> Chosen:
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    return Chosen(int(meta["step"]), float(meta["score"]), load_file(str(path)))


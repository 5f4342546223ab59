"""Evaluation during pretraining and the step whose weights a point keeps (the ViT paper's Fig 4 protocol: early
stopping, reporting the best score during training, so a small subset is not judged by an overfit last step).

Every `pretrain.eval_every` steps and at the end, `Probe` measures the current weights: upstream top-1 on the
source's test split (or, without one, the slice carved from it: `pipelines.data.held_out`) and few-shot on each
downstream task, logged at the global step. `Selector` keeps the step with the best few-shot headline (`select:
best`) or the last (`final`).

The few-shot a step is chosen on never reads a task's test split: its queries are a minival carved from the task's
train split (`minival`: a fixed 10%, at most 10,000 rows, the same for every point), its k-shot sets are drawn from
the rest. The study's few-shot evaluation then measures the chosen weights on the test split; chosen on that split,
its number would be the maximum over steps of the number reported, biased upwards by the choice.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from pipelines import downstream, evaluations
from pipelines.config import UserError
from pipelines.data import SourceConfig
from pipelines.data.stream import ShardSubset
from pipelines.fewshot import FewshotConfig
from pipelines.metrics import evaluate
from pipelines.runtime import Runtime

BEST_FILE = "best.safetensors"  # the best step's weights: in each checkpoint folder, and beside the final weights
HEADLINE_SHOTS = 5  # the paper's Fig 4 reports 5-shot linear accuracy
MINIVAL_FRACTION, MINIVAL_MAX = 0.1, 10_000  # the queries a step is chosen on, carved from each task's train split
MINIVAL_SEED = 0  # which rows: the same for every point and seed


def minival(train: ShardSubset) -> tuple[ShardSubset, ShardSubset]:
    """(the rest, the minival) of a downstream task's train split: the k-shot sets are drawn from the rest, the
    minival holds the queries (`finetune.split_minival`'s carving: rows by seeded key order, or whole shards where
    they can only be streamed)."""
    from pipelines.finetune import split_minival

    return split_minival(train, min(MINIVAL_FRACTION, MINIVAL_MAX / max(len(train), 1)), MINIVAL_SEED)


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
    at the global step, under `pretrain/val` and `pretrain/minival_fewshot/<task>` (few-shot on each task's
    `minival`, not on its test split)."""

    fewshot: FewshotConfig
    tasks: tuple[SourceConfig, ...]
    val: ShardSubset  # the pretraining source's test split or held-out slice: fixed, and never trained on
    model_name: str
    image_size: int
    runtime: Runtime
    on_curve: Callable[[str, int, dict[str, float]], None] | None = None
    splits: dict = field(default_factory=dict, compare=False)  # each task's (rest, minival), carved once

    def __call__(self, model: nn.Module, step: int) -> float:
        """Measure `model` (on every rank of a process group) and return its headline score."""
        loader = self.runtime.loader
        val = evaluate(model, self.val, self.image_size, self.runtime.device, loader.max_bad_fraction,
                       precision=self.runtime.precision)["top1"]
        only = downstream.EvaluateConfig(**{**dict.fromkeys(evaluations.names()), "fewshot": self.fewshot})
        pretrained = downstream.Pretrained(self.model_name, model, model.state_dict(), self.image_size)
        found = downstream.run(only, pretrained, self.tasks, self.runtime, cache=self._minival_splits())
        if self.on_curve is not None:
            self.on_curve("pretrain/val", step, {"top1": val})
            for task in self.tasks:
                self.on_curve(f"pretrain/minival_fewshot/{task.label}", step,
                              {f"{m.shots}shot_{m.metric}": m.value for m in found if m.dataset == task.label})
        return headline(found, self.fewshot.shots, self.tasks[0].label)

    def _minival_splits(self) -> dict:
        """An evaluation cache whose splits of each task are (the rest, the minival) of its train split: few-shot
        draws its k-shot sets from the first and queries the second (`downstream.Inputs.splits`)."""
        for task in self.tasks:
            if task.label not in self.splits:
                train, _ = downstream.task_splits(task, self.runtime.cache_dir, self.runtime.index_root)
                rest, held = minival(train)
                check_shots(rest, task, max(self.fewshot.shots))
                self.splits[task.label] = (rest, held)
        return {("splits", label): pair for label, pair in self.splits.items()}


def check_shots(rest: ShardSubset, task: SourceConfig, shots: int) -> None:
    """The rest of a task's train split still holds `shots` examples of every class it has
    (`downstream.fewest`, as the few-shot evaluation checks its whole train split)."""
    short, n = downstream.fewest(rest.labels, task.num_classes)
    if shots > n:
        raise UserError(f"pretrain.eval_every: {shots}-shot asked, but class {short} of downstream task "
                        f"'{task.label}' has {n} training examples outside the minival a step is "
                        f"chosen on ({MINIVAL_FRACTION:.0%} of its train split): fewer shots, or a larger task")


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
            self.best = Chosen(step, score, {k: v.detach().cpu().clone(memory_format=torch.contiguous_format)
                                             for k, v in self.model.state_dict().items()})  # a BiT is channels_last

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


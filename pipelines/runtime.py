"""Where and how a stage runs: one small object handed to every stage's `run()` instead of a dozen loose
parameters. What a stage computes stays in its own config; this holds only the surroundings (device, seed, data
locations, loader, progress and the stop poll), the same for every stage of one trial."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipelines.data.stream import LoaderConfig


@dataclass(frozen=True)
class Runtime:
    """The surroundings of a stage.

    Attributes:
        device: where the model runs (every rank of a process group passes its own).
        seed: the trial's seed; a stage derives its own streams from it.
        cache_dir: where sources are materialised (procedural sets, downloads); None where none is needed.
        index_root: where the array indexes live (the study's storage); None: beside the source.
        loader: how training data are streamed (worker processes, bad-sample budget, open shards); workers left
            out (a study sets them from its resources) are set from the CPUs this process may run on.
        progress: show progress bars.
        should_stop: polled at step boundaries; True stops training with a checkpoint (TrainingStopped).
        precision: of the passes through a frozen pretrained model (features, logits, diagnostics): the
            pretraining's (`perf.resolve_precision`: auto is bf16 on CUDA, fp32 on a CPU).
    """

    device: torch.device
    seed: int = 0
    cache_dir: Path | None = None
    index_root: Path | None = None
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    progress: bool = True
    should_stop: Callable[[], bool] | None = None
    precision: str = "auto"

    def __post_init__(self):
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        object.__setattr__(self, "loader", self.loader.for_cpus(cpus))  # frozen: set once, here

    def replace(self, **changes) -> Runtime:
        return dataclasses.replace(self, **changes)

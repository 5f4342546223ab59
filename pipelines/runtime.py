"""Where and how a stage runs: one small object handed to every stage's `run()` instead of a dozen loose
parameters. What a stage computes stays in its own config; this holds only the surroundings (device, seed, data
locations, loader, progress and the stop poll), the same for every stage of one trial."""

from __future__ import annotations

import dataclasses
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
        loader: how training data are streamed (worker processes, bad-sample budget, open shards).
        progress: show progress bars.
        should_stop: polled at step boundaries; True stops training with a checkpoint (TrainingStopped).
    """

    device: torch.device
    seed: int = 0
    cache_dir: Path | None = None
    index_root: Path | None = None
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    progress: bool = True
    should_stop: Callable[[], bool] | None = None

    def replace(self, **changes) -> Runtime:
        return dataclasses.replace(self, **changes)

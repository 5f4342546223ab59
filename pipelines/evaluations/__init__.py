"""The evaluations table: every evaluation a trial can run, one row each.

A row names the evaluation (its `evaluate.<name>` config key, its key in a point's record (`<name>/<task>` for one
that runs on each downstream task), the `eval` column of the results table and the prefix of its MLflow metrics), the
module that implements it, and what it needs. The module is loaded by name when the evaluation runs (big_vision loads
its evaluators the same way), so this table stays light enough for `analysis` to read without torch, and it travels to
Ray workers inside the parsed config. Each module exposes:

- `Config`: its typed config section (a frozen dataclass), and `DEFAULT`: the section when a study leaves the key
  out (None: off unless asked);
- `measure(cfg, inputs: pipelines.downstream.Inputs) -> list[Measurement]`;
- optionally `identity(cfg) -> dict`: what its protocol's identity hashes (default: its non-default settings and
  the downstream tasks), and `PROTOCOL_VERSION`: bumped when its code changes its results (re-runs it alone).

Adding an evaluation is one module and one row (README, "Add an evaluation").
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Literal

# What an evaluation needs, which also says where it runs: the frozen model's pre-logit features of each downstream
# task's whole splits (extracted once per task and shared), those of the train rows it chooses and the whole test
# split (taken from the whole split's where an enabled evaluation extracts it, else extracted for those rows alone),
# the pretrained weights and each task's splits (fine-tuning), or the first images of the pretraining source's
# held-out split (once per point, on the main rank).
FEATURES, ROW_FEATURES, PRETRAINED, PRETRAIN_IMAGES = "features", "row_features", "pretrained", "pretrain_images"
Need = Literal["features", "row_features", "pretrained", "pretrain_images"]


@dataclass(frozen=True)
class Evaluation:
    name: str
    module: str  # dotted path of the module with Config, DEFAULT and measure
    needs: Need

    @property
    def per_task(self) -> bool:
        """Runs on every downstream task (else once per point, on the pretraining source)."""
        return self.needs != PRETRAIN_IMAGES

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)


TABLE: tuple[Evaluation, ...] = (
    Evaluation("fewshot", "pipelines.evaluations.fewshot", ROW_FEATURES),
    Evaluation("linear_probe", "pipelines.evaluations.linear_probe", FEATURES),
    Evaluation("finetune", "pipelines.evaluations.finetune", PRETRAINED),
    Evaluation("diagnostics", "pipelines.evaluations.diagnostics", PRETRAIN_IMAGES),
)


def per_task(name: str) -> bool:
    """Whether the evaluation `name` runs on each downstream task (False for a name the table lacks)."""
    return any(row.name == name and row.per_task for row in TABLE)


def names() -> tuple[str, ...]:
    """The evaluations' names, in the table's order (read at call time: a row added later counts)."""
    return tuple(row.name for row in TABLE)

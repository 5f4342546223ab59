"""Content identities. A grid point is the hash of what determines its pretrained weights (model, seed, subset
size, the pretraining source, the recipe, `RECIPE_VERSION`); each evaluation is the hash of its own protocol
(its config, the downstream tasks, `EVAL_VERSION`). Settings that change only how or where a run executes
(workers, checkpoint cadence, gradient accumulation, compilation, loader processes, paths) are left out, so
changing them never retrains anything. The git commit is a tag, never part of a hash.

The subset manifest (which examples a point trains on) is a pure function of the source's keys, the subset size
and the seed, so hashing those hashes the manifest without reading the data; the manifest hash is logged too.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pipelines.config import to_dict

# Bump when a change to the training code changes the weights a given config produces.
RECIPE_VERSION = 1
# Bump when a change to an evaluation's code changes its numbers for given weights.
EVAL_VERSION = 1

# Per config section: fields that change how a run executes, not what it computes.
EXECUTION_ONLY = {
    "pretrain": {"checkpoint_every", "keep_checkpoints", "compile", "micro_batch_size", "grad_checkpointing",
                 "nonfinite_check_every"},
    "finetune": {"compile", "micro_batch_size", "nonfinite_check_every"},
    "source": {"name"},  # a label; the generator or the shards decide the pixels
}
EVAL_KINDS = ("fewshot", "linear_probe", "finetune", "diagnostics")


def digest(obj: Any) -> str:
    """16 hex digits of the SHA-256 of `obj`'s canonical JSON (sorted keys, no whitespace)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _without(section: dict, kind: str) -> dict:
    return {k: v for k, v in section.items() if k not in EXECUTION_ONLY.get(kind, ())}


def point_identity(cfg, model: str, subset_size: int, seed: int) -> dict:
    """What determines a grid point's pretrained weights, as plain data (`cfg` is a `StudyConfig`)."""
    return {"recipe_version": RECIPE_VERSION, "model": model, "subset_size": subset_size, "seed": seed,
            "source": _without(to_dict(cfg.data.pretrain), "source"),
            "pretrain": _without(to_dict(cfg.pretrain), "pretrain")}


def point_id(cfg, model: str, subset_size: int, seed: int) -> str:
    return digest(point_identity(cfg, model, subset_size, seed))


def eval_ids(cfg) -> dict[str, str]:
    """One identity per enabled evaluation (a changed `evaluate:` block re-runs only what changed)."""
    tasks = [_without(to_dict(task), "source") | {"name": task.label} for task in cfg.downstream]
    out = {}
    for kind in EVAL_KINDS:
        if kind == "diagnostics":
            if cfg.evaluate.diagnostics:
                out[kind] = digest({"v": EVAL_VERSION, "batch": cfg.evaluate.diagnostic_batch})
            continue
        section = getattr(cfg.evaluate, kind)
        if section is not None:
            out[kind] = digest({"v": EVAL_VERSION, kind: _without(to_dict(section), kind), "tasks": tasks})
    return out

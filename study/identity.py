"""Content identities. A grid point is the hash of what determines its pretrained weights (model, seed, subset
size, the pretraining source, the recipe, `RECIPE_VERSION`, and with `select: best` what the kept step is chosen
on); each evaluation, on each downstream task it runs on, is the hash of its own protocol (its config, that task,
`EVAL_VERSION`). Settings that change only how or where a run executes
(workers, checkpoint cadence, gradient accumulation, compilation, loader processes, paths) are left out, so
changing them never retrains anything. The git commit is a tag, never part of a hash.

The subset manifest (which examples a point trains on) is a pure function of the source's keys, the subset size,
the seed and the held-out slice's size (`data.holdout`, hashed where a slice is carved), so hashing those hashes
the manifest without reading the data; the manifest hash is logged too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from pipelines.config import to_dict
from study.protocol import eval_key

# Only values that differ from their field's default are hashed, so adding a config field whose default keeps
# today's behaviour keeps every identity (no retraining after an upgrade). Changing a default, or code that
# changes results, must bump these; tests/study/test_identity.py pins the defaults to catch that.
RECIPE_VERSION = 3  # 3: nested subsets by seeded key hash from the array index; 2: world-size-independent order
EVAL_VERSION = 2  # 2: fine-tuning streams in the world-size-independent order
# Hashed into the identity of sources whose pixels are decoded from files (webdataset, folder), not of the
# procedural source, whose pixels this path has never changed (so the default study keeps its ids).
IMAGE_VERSION = 2  # 2: JPEG crops by libjpeg-turbo at the crop's scale, torch's uint8 resize, wide-box crop fix

# Per config section: fields that change how a run executes, not what it computes.
EXECUTION_ONLY = {
    "pretrain": {"checkpoint_every", "keep_checkpoints", "compile", "micro_batch_size", "grad_checkpointing",
                 "nonfinite_check_every", "log_every"},
    "finetune": {"compile", "micro_batch_size", "nonfinite_check_every", "log_every"},
    "source": {"name"},  # a label; the generator or the shards decide the pixels
}


def digest(obj: Any) -> str:
    """16 hex digits of the SHA-256 of `obj`'s canonical JSON (sorted keys, no whitespace)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def settings(obj: Any, kind: str = "") -> dict:
    """The non-default, result-shaping fields of a config dataclass, nested dataclasses included."""
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.name in EXECUTION_ONLY.get(kind, ()):
            continue
        if dataclasses.is_dataclass(value):
            if (nested := settings(value)) or _default(f) is None:
                out[f.name] = nested
            continue
        if _default(f) != value:
            out[f.name] = to_dict(value)
    return out


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def point_identity(cfg, model: str, subset_size: int, seed: int) -> dict:
    """What determines a grid point's pretrained weights, as plain data (`cfg` is a `StudyConfig`): its pretraining
    settings are `model`'s, recipes merged, so a recipe moves the points it applies to and only those."""
    mode = {} if cfg.data.subset_mode == "samples" else {"subset_mode": cfg.data.subset_mode}
    return {"recipe_version": RECIPE_VERSION, "model": model, "subset_size": subset_size, "seed": seed, **mode,
            **held_out(cfg), "source": source_settings(cfg.data.pretrain),
            "pretrain": pretrain_settings(cfg.pretrain_for(model)), **selected_on(cfg, model)}


def selected_on(cfg, model: str) -> dict:
    """{"select_on": ...} where `model` keeps its best step (`select: best` with evaluation during training): the
    step is chosen on few-shot top-1 on the first downstream task (`pipelines.selection.headline`), so that task's
    data (not its name), the headline k's few-shot protocol and the minival it queries decide which weights the
    point keeps. {} otherwise:
    the last step's weights do not depend on what is measured along the way, and a point keeping them keeps its id."""
    if not cfg.pretrain_for(model).selects_best:
        return {}
    from pipelines import selection
    from pipelines.evaluations import fewshot as fewshot_evaluation

    fewshot = cfg.evaluate.fewshot  # its k-shot sets are nested prefixes, so only the headline k's matters
    on = {"task": source_settings(cfg.downstream[0]), "shots": selection.headline_shots(fewshot.shots),
          "l2_reg": fewshot.l2_reg, "repeats": fewshot.repeats,
          # the queries: a minival of the task's train split (points chosen on its test split, before, train again)
          "queries": {"minival": selection.MINIVAL_FRACTION, "at_most": selection.MINIVAL_MAX,
                      "seed": selection.MINIVAL_SEED}}
    if (version := getattr(fewshot_evaluation, "PROTOCOL_VERSION", None)) is not None:  # its code changed scores
        on["protocol_version"] = version
    return {"select_on": on}


def pretrain_settings(recipe) -> dict:
    """A pretraining recipe's non-default, result-shaping fields. `select` shapes nothing without evaluation during
    training (the last step's weights are kept either way), so it is left out then."""
    out = settings(recipe, "pretrain")
    if recipe.eval_steps is None:
        out.pop("select", None)
    return out


def held_out(cfg) -> dict:
    """{"holdout": rows} where a slice is carved from the pretraining source (its subsets then hold other rows);
    {} where none is (a source with a test split, or no validation asked), so those points keep their ids."""
    return {"holdout": cfg.holdout} if cfg.holdout else {}


def source_settings(src) -> dict:
    """A source's non-default settings, with the image-path version where its pixels are decoded from files."""
    return settings(src, "source") | image_version(src)


def image_version(src) -> dict:
    """{"image_version": IMAGE_VERSION} for a source decoded from files; {} for the procedural one."""
    return {} if src.source == "shapes" else {"image_version": IMAGE_VERSION}


def _full(obj, kind: str) -> dict:
    """A config in full, defaults included, its execution-only fields left out."""
    return {k: v for k, v in to_dict(obj).items() if k not in EXECUTION_ONLY.get(kind, ())}


def recipe_params(cfg, model: str) -> dict:
    """`model`'s pretraining recipe and the source in full (defaults included, execution-only fields left out), for
    people reading a run: the same for every invocation of a point, as MLflow's immutable params must be."""
    return {"recipe_version": RECIPE_VERSION, **image_version(cfg.data.pretrain), "subset_mode": cfg.data.subset_mode,
            **held_out(cfg), "source": _full(cfg.data.pretrain, "source"),
            "pretrain": _full(cfg.pretrain_for(model), "pretrain"), **selected_on(cfg, model)}


def eval_params(cfg) -> dict:
    """The evaluation recipe in full, for people reading a run (its hashes are `eval_ids`): every enabled
    evaluation's config and each downstream task, by name."""
    return {"eval_version": EVAL_VERSION,
            "evaluate": {row.name: _full(section, row.name) for row, section in cfg.evaluate.enabled()},
            "downstream": {task.label: _full(task, "source") for task in cfg.downstream}}


def point_id(cfg, model: str, subset_size: int, seed: int) -> str:
    return digest(point_identity(cfg, model, subset_size, seed))


def eval_ids(cfg) -> dict[str, str]:
    """One identity per enabled evaluation and, for one that runs on each downstream task, per task ({`kind/task`:
    id}, `study.protocol.eval_key`), so a changed `evaluate:` block re-runs only what changed and a task added to
    `downstream` runs only on it. What is hashed: the protocol (the module's `identity`, or its non-default
    settings and, per task, that task), the module's `PROTOCOL_VERSION` where it has one (a change to one
    evaluation re-runs that one alone) and `EVAL_VERSION`. A study with one downstream task has the ids it had
    when an evaluation's id hashed the whole task list."""
    out = {}
    for row, section in cfg.evaluate.enabled():
        module = row.load()
        protocol = getattr(module, "identity", None)
        what = protocol(section) if protocol is not None else {row.name: settings(section, row.name)}
        if (version := getattr(module, "PROTOCOL_VERSION", None)) is not None:  # that evaluation's alone changed
            what["protocol_version"] = version
        if not row.per_task:
            out[row.name] = digest({"v": EVAL_VERSION, **what})
            continue
        for task in cfg.downstream:
            tasks = [source_settings(task) | {"name": task.label}]
            out[eval_key(row.name, task.label)] = digest({"v": EVAL_VERSION, **what, "tasks": tasks})
    return out

"""One grid point: pretrain -> linear few-shot -> fine-tune. `run_point` is plain Python (no Ray, no MLflow);
`trainable` is the Ray Tune function trainable around it."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from pipelines import checkpoint, data, diagnostics, fewshot, finetune, linear_probe, models, pretrain
from pipelines.config import UserError, from_dict, to_dict
from pipelines.data.stream import ShardSubset
from pipelines.training import TrainingDiverged, evaluate, infer, pick_device
from study.config import GridPoint, StudyConfig, grid_point

Report = Callable[[dict], None]


def run_point(cfg: StudyConfig, point: GridPoint, report: Report, out_dir: Path | None,
              progress: bool = False, on_checkpoint: Callable[[Path], None] | None = None) -> dict:
    """Run one trial; `report` receives params once, then per-epoch metrics, then the final metrics.

    Pretraining checkpoints go to `out_dir/checkpoints`; a restarted trial resumes from the newest one.

    Returns:
        the final metrics (also passed to `report`).
    """
    device = pick_device(cfg.resources.gpus_per_trial)
    src, loader = cfg.data.pretrain, cfg.data.loader
    shards = data.prepare(src, cfg.cache_dir, progress=False)
    train = _pretraining_data(cfg, point, shards["train"])
    report({"params": {"manifest_hash": data.manifest_hash(train.keys), "device": str(device),
                       "planned_steps": point.steps, "data_loading": "stream" if isinstance(
                           train, ShardSubset) else "memory", "loader_workers": loader.workers}})
    if out_dir is not None and (resume := checkpoint.latest(out_dir / "checkpoints")) is not None:
        report({"final": {"resumed_from_step": int(resume.name.removeprefix(checkpoint.PREFIX))}})
    balance = data.class_counts(train.labels, src.num_classes)
    report({"params": {"class_count_min": balance["min"], "class_count_max": balance["max"],
                       "empty_classes": balance["empty_classes"]}})
    if out_dir is not None:
        (out_dir / "class_counts.json").write_text(json.dumps(balance))
        report({"artifacts": [str(out_dir / "class_counts.json")]})
    result = pretrain.run(cfg.pretrain, point.model, train, src.num_classes, src.image_size, point.seed, device,
                          out_dir, on_epoch=lambda m: report({"step": m["epoch"], "curves": {
                              f"pretrain/{k}": v for k, v in m.items() if k != "epoch"}}), progress=progress,
                          checkpoint_dir=out_dir / "checkpoints" if out_dir else None, on_checkpoint=on_checkpoint,
                          loader=loader)
    probe_keys = sorted(train.keys)[:cfg.evaluate.diagnostic_batch]
    del train
    final = {"examples_seen": result.examples_seen, "pretrain_flops": point.pretrain_flops,
             "pretrain/seconds": result.seconds}
    model = models.build(point.model, src.num_classes, src.image_size)
    model.load_state_dict(result.state_dict)
    model.to(device)
    if "test" in shards:  # held-out upstream accuracy: is the model data- or optimisation-limited?
        val = data.load(shards["test"], src.image_size, max_bad_fraction=loader.max_bad_fraction)
        final["pretrain/val_top1"] = evaluate(model, val, src.image_size, device)["top1"]
        probe_images = val.images[:cfg.evaluate.diagnostic_batch]
    else:
        probe_images = data.load(shards["train"], src.image_size, probe_keys).images
    if cfg.evaluate.diagnostics:
        final.update(_diagnose(point, model, probe_images, src.image_size, device, out_dir, report))
    final.update(_evaluate_downstream(cfg, point, model, result.state_dict, device, report, progress))
    report({"final": final})
    return final


def _pretraining_data(cfg: StudyConfig, point: GridPoint, train_shards: list[str]) -> data.ImageArrays | ShardSubset:
    """The grid point's nested subset: streamed from shards, or (an ImageNet-style folder) loaded into memory."""
    src = cfg.data.pretrain
    if src.source == "folder":
        keys = data.nested_subset(data.source_keys(src, train_shards), point.subset_size, point.seed)
        return data.load(train_shards, src.image_size, keys, max_bad_fraction=cfg.data.loader.max_bad_fraction)
    index = data.source_index(src, train_shards, cfg.data.loader.max_bad_fraction)
    return ShardSubset(index, data.nested_subset(index.all_keys, point.subset_size, point.seed))


def _diagnose(point: GridPoint, model, images, image_size: int, device, out_dir: Path | None,
              report: Report) -> dict:
    """Fig 7 numbers for every model; for a ViT also its Fig 7 panels, saved beside the weights."""
    from analysis.plots import fig7_panels

    diag = diagnostics.run(model, images, image_size, device)
    out = dict(diag.metrics)
    if diag.family == "ViT" and out_dir is not None:
        path = out_dir / "fig7.png"
        fig7_panels(diag, path, f"{point.model}, {point.subset_size:,} pretraining examples")
        report({"artifacts": [str(path)]})
        out["fig7_path"] = str(path)
    return out


def _evaluate_downstream(cfg: StudyConfig, point: GridPoint, model, state, device, report: Report,
                         progress: bool) -> dict:
    """Every enabled evaluation on every downstream task; features are extracted once per task and shared."""
    out = {}
    image_size = cfg.data.pretrain.image_size
    ev = cfg.evaluate
    for i, task in enumerate(cfg.downstream):
        name = task.label
        shards = data.prepare(task, cfg.cache_dir, progress=False)
        train, test = data.load(shards["train"], task.image_size), data.load(shards["test"], task.image_size)
        if ev.fewshot or ev.linear_probe:  # frozen pre-logit features at the pretraining resolution
            feats = [infer(model, split.images, image_size, device, pre_logits=True) for split in (train, test)]
        if ev.fewshot:
            shots = fewshot.run(ev.fewshot, feats[0], train.labels, feats[1], test.labels, point.seed)
            for k in ev.fewshot.shots:
                out[f"fewshot/{name}/{k}shot_top1"] = shots.top1[k]
                out[f"fewshot/{name}/{k}shot_top1_std"] = shots.top1_std[k]
                if i == 0:  # the first task is the study's headline task, also logged under plain names
                    out[f"fewshot_{k}shot_top1"] = shots.top1[k]
        if ev.linear_probe:
            probe = linear_probe.run(ev.linear_probe, feats[0], train.labels, feats[1], test.labels, point.seed)
            out.update({f"linear_probe/{name}/top1": probe.top1, f"linear_probe/{name}/macro_f1": probe.macro_f1,
                        f"linear_probe/{name}/l2": probe.l2})
        if ev.finetune:
            curve = lambda m, name=name: report(  # noqa: E731
                {"step": m["epoch"], "curves": {f"finetune/{name}/{k}": v for k, v in m.items() if k != "epoch"}})
            ft = finetune.run(ev.finetune, point.model, state, train, test, task.num_classes, point.seed, device,
                              progress=progress, desc=f"finetune {name}", on_epoch=curve)
            out.update({f"finetune/{name}/top1": ft.top1, f"finetune/{name}/macro_f1": ft.macro_f1,
                        f"finetune/{name}/seconds": ft.seconds})
            if i == 0:
                out["finetune_top1"] = ft.top1
    return out


def trial_config(cfg: StudyConfig) -> dict:
    """Tune's param space: the resolved study plus the three grid axes, which Tune expands and shows."""
    from ray import tune

    return {"study": to_dict(cfg), "model": tune.grid_search(list(cfg.models)),
            "subset_size": tune.grid_search(list(cfg.data.subsets)), "seed": tune.grid_search(list(cfg.seeds))}


def trial_point(config: dict) -> tuple[StudyConfig, GridPoint]:
    cfg = from_dict(StudyConfig, config["study"])
    return cfg, grid_point(cfg, config["model"], config["subset_size"], config["seed"])


def _restore_tune_checkpoint(restored, local: Path) -> None:
    """A retried trial on another node: bring Tune's latest checkpoint into the local checkpoint folder."""
    if restored is None or checkpoint.latest(local) is not None:
        return
    with restored.as_directory() as folder:
        step = torch.load(Path(folder) / "state.pt", weights_only=True)["step"]
        shutil.copytree(folder, local / f"{checkpoint.PREFIX}{step:09d}")


def trainable(config: dict) -> None:
    """Ray Tune function trainable. Failures known to be deterministic (divergence, bad data) are reported
    as the trial's `failure` and end it without a retry; anything else raises so Tune's FailureConfig applies."""
    from ray import tune

    cfg, point = trial_point(config)
    torch.set_num_threads(max(1, int(cfg.resources.cpus_per_trial)))
    out_dir = Path(tune.get_context().get_trial_dir())
    _restore_tune_checkpoint(tune.get_checkpoint(), out_dir / "checkpoints")
    start = time.time()

    def persist(path: Path) -> None:  # Tune copies it to the run's storage, where a retry on any node finds it
        tune.report({"checkpoint": path.name}, checkpoint=tune.Checkpoint.from_directory(str(path)))

    try:
        run_point(cfg, point, tune.report, out_dir, on_checkpoint=persist)
    except (TrainingDiverged, UserError) as err:
        tune.report({"failure": f"{type(err).__name__}: {err}", "seconds": time.time() - start})

"""Ray Tune, kept behind one small module: a local Ray started and stopped here (or `--address` to join a
cluster), one trial per grid point, the MLflow callback attached, results collected."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import ray
from ray import tune

from study.config import StudyConfig
from study.tracking import MlflowTuneCallback, StudyTracker
from study.trial import trainable, trial_config, trial_point


def run_grid(cfg: StudyConfig, tracker: StudyTracker, tags: dict, storage: Path,
             address: str | None = None) -> tuple[list[tuple[dict, dict]], dict[str, str]]:
    """Run every grid point as a Tune trial.

    Returns:
        ([(grid point, final metrics)] of the trials that finished, {trial name: reason} of those that failed).
    """
    if address:
        ray.init(address=address)
    else:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, configure_logging=True,
                 logging_level="warning")
    try:
        resources = {"cpu": cfg.resources.cpus_per_trial, "gpu": cfg.resources.gpus_per_trial}
        tuner = tune.Tuner(
            tune.with_resources(trainable, resources),
            param_space=trial_config(cfg),
            tune_config=tune.TuneConfig(max_concurrent_trials=cfg.resources.max_concurrent_trials or None,
                                        trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
            run_config=tune.RunConfig(name=cfg.study, storage_path=str(storage),
                                      callbacks=[MlflowTuneCallback(tracker, tags)],
                                      failure_config=tune.FailureConfig(max_failures=cfg.resources.max_failures),
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=2), verbose=1),
        )
        grid = tuner.fit()
    finally:
        ray.shutdown()
    finished, failures = [], {}
    for result in grid:
        _, point = trial_point(result.config)
        metrics = result.metrics or {}
        reason = metrics.get("failure")
        if reason is None and result.error is not None:
            reason = (str(result.error).strip().splitlines() or ["trial raised an error"])[-1]
        if reason is None and "final" not in metrics:
            reason = "no final metrics reported"
        if reason:
            failures[point.name] = reason
            continue
        finished.append(({**dataclasses.asdict(point), "pretrain_flops": point.pretrain_flops}, metrics["final"]))
    return finished, failures


def _trial_name(trial) -> str:
    return trial_point(trial.config)[1].name

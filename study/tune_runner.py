"""Ray Tune, kept behind one small module: a local Ray started and stopped here (or `--address` to join a
cluster), one trial per planned grid point (Tune receives the expanded points, it does not expand a grid), and
a driver-side callback that turns the trials' typed events into MLflow writes and records."""

from __future__ import annotations

import os
from pathlib import Path

import ray
from ray import tune
from ray.tune import Callback

from study.config import StudyConfig
from study.protocol import Curve, Failed, Finished, PointRecord, Started, decode
from study.storage import Storage
from study.tracking import Tracker
from study.trial import TrialPlan, trainable


class StudyCallback(Callback):
    """Per trial: Started -> child run and params, Curve -> per-epoch metrics, Finished -> the record, final
    metrics and artifacts, Failed (or a crash Tune gave up on) -> the reason."""

    def __init__(self, plans: dict[str, TrialPlan], on_finished, tracker: Tracker, tags: dict):
        self.plans, self.on_finished, self.tracker, self.tags = plans, on_finished, tracker, tags
        self.records: dict[str, PointRecord] = {}
        self.failures: dict[str, str] = {}

    def __getstate__(self) -> dict:
        # Tune pickles its callbacks into the experiment state; this study never restores a Tuner (it re-plans
        # from MLflow and storage), so the live tracker and its thread stay out of that file.
        return {k: v for k, v in self.__dict__.items() if k not in ("tracker", "on_finished")}

    def _point(self, trial):
        return self.plans[trial.config["point"]].point

    def on_trial_result(self, iteration, trials, trial, result, **info):
        event, point = decode(result), self._point(trial)
        match event:
            case Started(params=params, metrics=metrics):
                self.tracker.start_point(point, params, metrics, self.tags)
            case Curve(prefix=prefix, step=step, values=values):
                self.tracker.log_curve(point, prefix, step, values)
            case Finished(record=record):
                self.records[point.id] = record
                self.on_finished(point, record)
            case Failed(reason=reason):
                self.failures[point.id] = reason
                self.tracker.fail_point(point, reason, self.tags)

    def on_trial_error(self, iteration, trials, trial, **info):
        point = self._point(trial)
        self.failures[point.id] = _error_text(trial)
        self.tracker.fail_point(point, self.failures[point.id], self.tags)


def run_trials(cfg: StudyConfig, plans: dict[str, TrialPlan], storage: Storage, callback: StudyCallback,
               address: str | None, name: str) -> None:
    """Run one Tune trial per plan; results arrive through `callback`."""
    if address:
        ray.init(address=address)
    else:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, configure_logging=True,
                 logging_level="warning")
    try:
        resources = {"cpu": cfg.resources.cpus_per_trial, "gpu": cfg.resources.gpus_per_trial}
        fn = tune.with_parameters(trainable, plans=plans, cfg=cfg, storage_root=storage.root)
        tuner = tune.Tuner(
            tune.with_resources(fn, resources),
            param_space={"point": tune.grid_search(list(plans))},
            tune_config=tune.TuneConfig(max_concurrent_trials=cfg.resources.max_concurrent_trials or None,
                                        trial_name_creator=TrialNames(plans),
                                        trial_dirname_creator=TrialNames(plans)),
            run_config=tune.RunConfig(name=name, storage_path=storage.uri("tune"),
                                      callbacks=[callback],
                                      failure_config=tune.FailureConfig(max_failures=cfg.resources.max_failures),
                                      verbose=1),
        )
        tuner.fit()
    finally:
        ray.shutdown()


class TrialNames:
    """Tune's trial names: the grid point's readable name (a picklable callable, not a lambda)."""

    def __init__(self, plans: dict[str, TrialPlan]):
        self.names = {pid: plan.point.name for pid, plan in plans.items()}

    def __call__(self, trial) -> str:
        return self.names[trial.config["point"]]


def _error_text(trial) -> str:
    path = getattr(trial, "error_file", None)
    if path and Path(path).exists():
        lines = [ln for ln in Path(path).read_text().splitlines() if ln.strip()]
        return lines[-1] if lines else "trial raised an error"
    return "trial raised an error"

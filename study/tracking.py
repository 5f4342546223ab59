"""MLflow, kept behind one small module. The driver is the single writer: trials report to Ray Tune, and a
Tune callback in the driver logs to MLflow, so any store (the default SQLite file included) is safe with
many concurrent trials. One parent run per study, one child run per grid point (reused on a retry)."""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from ray.tune import Callback

from pipelines.config import flatten
from study.trial import trial_point

PARENT_TAG = "mlflow.parentRunId"
_BATCH = 900  # MLflow's log_batch accepts at most 1000 entries


def default_tracking_uri(root: Path) -> str:
    return f"sqlite:///{(root / 'mlflow.db').resolve()}"


def ui_command(tracking_uri: str) -> str:
    return f"mlflow ui --backend-store-uri {tracking_uri}" if tracking_uri.startswith("sqlite") else \
        f"open {tracking_uri} in a browser"


class StudyTracker:
    """The study's parent run and its child runs."""

    def __init__(self, tracking_uri: str, experiment: str, artifact_root: Path):
        mlflow.set_tracking_uri(tracking_uri)
        self.client = MlflowClient(tracking_uri)
        found = self.client.get_experiment_by_name(experiment)
        self.experiment_id = found.experiment_id if found else self.client.create_experiment(
            experiment, artifact_location=artifact_root.resolve().as_uri())
        self.parent_id = ""

    def start_parent(self, run_name: str, params: dict, tags: dict, files: list[Path]) -> str:
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
        self.parent_id = run.info.run_id
        self._log(self.parent_id, params=params)
        for f in files:
            self.client.log_artifact(self.parent_id, str(f))
        return self.parent_id

    def start_child(self, run_name: str, params: dict, tags: dict) -> str:
        run = self.client.create_run(self.experiment_id, run_name=run_name,
                                     tags={PARENT_TAG: self.parent_id, **tags})
        self._log(run.info.run_id, params=params)
        return run.info.run_id

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        self._log(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()
                                   if isinstance(v, int | float) and math.isfinite(v)])

    def finish(self, run_id: str, status: str = "FINISHED", reason: str = "") -> None:
        if reason:
            self.client.set_tag(run_id, "failure_reason", reason[:5000])
        self.client.set_terminated(run_id, status=status)

    def _log(self, run_id: str, params: dict | None = None, metrics: list[Metric] | None = None) -> None:
        plist = [Param(k, str(v)[:6000]) for k, v in flatten(params or {}).items()]
        for i in range(0, len(plist), _BATCH):
            self.client.log_batch(run_id, params=plist[i:i + _BATCH])
        metrics = metrics or []
        for i in range(0, len(metrics), _BATCH):
            self.client.log_batch(run_id, metrics=metrics[i:i + _BATCH])

    def set_tags(self, run_id: str, tags: dict) -> None:
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


class MlflowTuneCallback(Callback):
    """Turns each Tune trial into a child run: params at start, per-epoch and final metrics, status at end."""

    def __init__(self, tracker: StudyTracker, tags: dict):
        self.tracker = tracker
        self.tags = tags
        self.runs: dict[str, str] = {}  # trial_id -> MLflow run id; a retried trial keeps its run
        self.failures: dict[str, str] = {}

    def on_trial_start(self, iteration, trials, trial, **info):
        if trial.trial_id in self.runs:
            return
        _, point = trial_point(trial.config)
        params = {**dataclasses.asdict(point), "pretrain_flops": point.pretrain_flops,
                  "config": trial.config["study"]}
        self.runs[trial.trial_id] = self.tracker.start_child(
            f"{point.model} n={point.subset_size} seed={point.seed}", params,
            {**self.tags, "trial_id": trial.trial_id})

    def on_trial_result(self, iteration, trials, trial, result, **info):
        run_id = self.runs[trial.trial_id]
        if "params" in result:
            self.tracker._log(run_id, params=result["params"])
        if "curves" in result:  # per-epoch metrics of a stage, keyed by their MLflow names
            self.tracker.log_metrics(run_id, result["curves"], step=int(result.get("step", 0)))
        if "final" in result:
            self.tracker.log_metrics(run_id, result["final"])
        for path in result.get("artifacts") or []:
            if Path(path).exists():  # local Ray; on a cluster the trial's own storage keeps it
                self.tracker.client.log_artifact(run_id, path)
        if "failure" in result:
            self.failures[trial.trial_id] = result["failure"]

    def on_trial_complete(self, iteration, trials, trial, **info):
        reason = self.failures.get(trial.trial_id, "")
        self.tracker.finish(self.runs[trial.trial_id], "FAILED" if reason else "FINISHED", reason)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.tracker.finish(self.runs[trial.trial_id], "FAILED", _error_text(trial))


def _error_text(trial) -> str:
    path = getattr(trial, "error_file", None)
    if path and Path(path).exists():
        lines = [ln for ln in Path(path).read_text().splitlines() if ln.strip()]
        return lines[-1] if lines else "trial raised an error"
    return "trial raised an error"

"""The tidy results table from an MLflow experiment written by `study.run`, through MLflow's public client API
(run params and metrics), so a study can be re-reported from its tracking store alone."""

from __future__ import annotations

import pandas as pd
from mlflow.tracking import MlflowClient

from analysis import results
from pipelines.config import UserError

PARENT_TAG = "mlflow.parentRunId"


def table_from_experiment(name: str, tracking_uri: str) -> pd.DataFrame:
    """Rows of the FINISHED child runs of the experiment's most recent study (parent) run."""
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        known = [e.name for e in client.search_experiments()]
        raise UserError(f"no MLflow experiment '{name}' at {tracking_uri}; experiments there: {', '.join(known)}")
    runs = client.search_runs([experiment.experiment_id], max_results=50_000)
    parents = sorted((r for r in runs if PARENT_TAG not in r.data.tags), key=lambda r: r.info.start_time)
    if not parents:
        raise UserError(f"experiment '{name}' has no study run")
    parent = parents[-1].info.run_id
    records = []
    for run in runs:
        if run.data.tags.get(PARENT_TAG) != parent or run.info.status != "FINISHED":
            continue
        p = run.data.params
        trial = {"model": p["model"], "family": p["family"], "subset_size": int(p["subset_size"]),
                 "seed": int(p["seed"]), "examples_seen": int(p["examples_seen"]),
                 "pretrain_flops": float(p["pretrain_flops"])}
        records += results.records_from_metrics(trial, run.data.metrics)
    if not records:
        raise UserError(f"the latest study run of '{name}' has no finished trials with evaluation metrics")
    return results.build_table(records)

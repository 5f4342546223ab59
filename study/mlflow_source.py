"""The tidy results table of a study from its MLflow tracking store alone: the `results.csv` artifact that
`study.run` logs to the study's parent run after every invocation (the same table, not metric names parsed
back), read through MLflow's public client API; and the report rebuilt from it.

    python -m study.mlflow_source --experiment NAME [--tracking-uri URI] --out DIR
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import pandas as pd
from mlflow.tracking import MlflowClient

from analysis import report, results
from pipelines.config import UserError
from study.tracking import ROLE_TAG


def study_run_id(client: MlflowClient, name: str) -> str:
    """The id of experiment `name`'s most recent study (parent) run."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        known = [e.name for e in client.search_experiments()]
        raise UserError(f"no MLflow experiment '{name}' at {client.tracking_uri}; experiments there: "
                        f"{', '.join(known)}")
    parents = client.search_runs([experiment.experiment_id], f"tags.{ROLE_TAG} = 'parent'",
                                 order_by=["attributes.start_time DESC"], max_results=1)
    if not parents:
        raise UserError(f"experiment '{name}' has no study run")
    return parents[0].info.run_id


def table_from_experiment(name: str, tracking_uri: str) -> pd.DataFrame:
    """The results table of the experiment's most recent study (parent) run."""
    client = MlflowClient(tracking_uri)
    run_id = study_run_id(client, name)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run_id, "results.csv", tmp)
        except Exception:  # noqa: BLE001  (MLflow raises several types for a missing artifact)
            raise UserError(f"the latest study run of '{name}' has no results.csv yet (it is logged when an "
                            "invocation finishes)") from None
        return results.read(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m study.mlflow_source",
                                     description="Rebuild a study's report from its MLflow store alone.")
    parser.add_argument("--experiment", required=True, help="MLflow experiment (study) name: its latest study run")
    parser.add_argument("--tracking-uri", default="sqlite:///runs/mlflow.db")
    parser.add_argument("--out", required=True, help="output folder")
    args = parser.parse_args(argv)
    out = Path(args.out)
    return report.report_command(lambda: report.write_report(
        table_from_experiment(args.experiment, args.tracking_uri), out, title=args.experiment), out)


if __name__ == "__main__":
    sys.exit(main())

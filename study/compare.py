"""`analysis.compare` with MLflow experiments among its inputs: `mlflow:EXPERIMENT` (at `--tracking-uri`) or
`mlflow:TRACKING_URI#EXPERIMENT`. Each such study's table is the `results.csv` of its latest study (parent) run
(`study.mlflow_source`), and the comparison report is logged back to that run under `comparisons/<out folder>-<time>`.

    python -m study.compare runs/smoke/ mlflow:sqlite:///runs/mlflow.db#smoke configs/published/vit_bit_imagenet.csv \\
        --label folder --label mlflow --label published --out DIR

The analysis package stays free of MLflow: this module resolves the MLflow inputs and hands `analysis.compare` the
tables.
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
from mlflow.tracking import MlflowClient

from analysis import compare
from study import mlflow_source

DEFAULT_TRACKING_URI = "sqlite:///runs/mlflow.db"


def experiment_of(spec: str, default_uri: str) -> tuple[str, str] | None:
    """(tracking URI, experiment name) of an `mlflow:` input, None for any other input. The experiment name follows
    the last '#', so a URI may hold ':' and '/' freely."""
    if not spec.startswith(compare.MLFLOW_PREFIX):
        return None
    uri, _, name = spec[len(compare.MLFLOW_PREFIX):].rpartition("#")
    return uri or default_uri, name


def log_to_study_runs(studies: list[compare.Study], out: Path, default_uri: str) -> None:
    """The comparison folder, as artifacts of every MLflow input's study run, under `comparisons/<out>-<time>`."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for study in studies:
        where = experiment_of(study.source, default_uri)
        if where is None:
            continue
        client = MlflowClient(where[0])
        run_id = mlflow_source.study_run_id(client, where[1])
        folder = f"comparisons/{out.resolve().name}-{stamp}"  # (by --out's name alone, a second one replaced it)
        client.log_artifacts(run_id, str(out), folder)
        print(f"logged:  to the study run {run_id} of '{where[1]}' ({where[0]}), {folder}")


def main(argv: list[str] | None = None) -> int:
    parser = compare.parser("python -m study.compare", __doc__.split("\n\n")[0])
    parser.add_argument("--tracking-uri", default=DEFAULT_TRACKING_URI,
                        help="where an `mlflow:EXPERIMENT` input without a URI lives")
    args = parser.parse_intermixed_args(argv)  # options between the inputs, as `study.run` takes them

    def resolve(spec: str) -> tuple[str, pd.DataFrame]:
        where = experiment_of(spec, args.tracking_uri)
        if where is None:
            return compare.read_input(spec)
        return where[1], mlflow_source.table_from_experiment(where[1], where[0])

    def then(studies: list[compare.Study], out: Path) -> None:
        log_to_study_runs(studies, out, args.tracking_uri)

    return compare.command(args, resolve, then)


if __name__ == "__main__":
    from study.cli import exit_now

    exit_now(main())

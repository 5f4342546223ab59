"""The tidy results table of a study from its MLflow tracking store alone: the `results.csv` artifact that
`study.run` logs to the study's parent run after every invocation (the same table, not metric names parsed
back), read through MLflow's public client API; and the report rebuilt from it.

    python -m study.mlflow_source --experiment NAME [--tracking-uri URI] --out DIR
"""

from __future__ import annotations

import argparse
import re
import sqlite3
import sys
import tempfile
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from analysis import report, results
from pipelines.config import UserError
from study.tracking import ROLE_TAG, check_tracking_uri, open_client


def open_store(tracking_uri: str) -> MlflowClient:
    """A client of the tracking store at `tracking_uri`, which must exist: MLflow makes a missing sqlite database
    (and its folders) on first use, so a mistyped path would leave an empty store behind and find no study in it.

    Raises:
        UserError: one line, for a scheme MLflow does not take, a local store that is not there, or a database
            store without its driver.
    """
    check_tracking_uri(tracking_uri)
    scheme = urlparse(tracking_uri).scheme.split("+")[0].lower()
    if scheme == "sqlite":
        path = Path(tracking_uri.partition("://")[2].removeprefix("/").partition("?")[0])
        found = _holds_mlflow(path) if path.is_file() else False
        if found is None:
            raise UserError(f"{tracking_uri}: {path} is not an SQLite database; a study's store is its --out "
                            "folder's mlflow.db")
        if not found:  # missing, or a database MLflow would add its tables to
            raise UserError(f"no MLflow store at {path} ({tracking_uri}); a study's is its --out folder's mlflow.db")
    elif scheme in ("", "file"):
        path = Path(url2pathname(urlparse(tracking_uri).path) if scheme else tracking_uri)
        if not path.is_dir():
            raise UserError(f"no MLflow store at {path} ({tracking_uri}): no such folder")
    return open_client(tracking_uri)


def _holds_mlflow(path: Path) -> bool | None:
    """Whether an SQLite file holds MLflow's tables (an empty file holds none), read-only; None for a file that is
    not SQLite. One this process cannot read now (locked) counts as MLflow's: MLflow then says what it finds."""
    try:
        with closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as db:
            query = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'experiments'"
            return db.execute(query).fetchone() is not None
    except sqlite3.OperationalError:
        return True
    except sqlite3.DatabaseError:
        return None


@contextmanager
def store_errors(tracking_uri: str) -> Iterator[None]:
    """MLflow's errors reading the store as one line: a server that cannot be reached (MLflow wraps the
    connection error of `requests`), or MLflow's own first line."""
    import requests

    try:
        yield
    except MlflowException as err:
        cause: BaseException | None = err
        while cause is not None and not isinstance(cause, requests.ConnectionError | requests.Timeout):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            errno = re.search(r"\[Errno -?\d+\] ([^'\")]+)", str(cause))
            why = "timed out" if isinstance(cause, requests.Timeout) else errno[1] if errno else type(cause).__name__
            raise UserError(f"cannot reach the MLflow tracking server at {tracking_uri} ({why})") from None
        first = (str(err.message).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"MLflow at {tracking_uri}: {first}") from None


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
    if (status := parents[0].info.status) != "FINISHED":  # its table is the last one an invocation of it wrote
        print(f"note: the latest study run of '{name}' is {status} (its last invocation "
              f"{'is running' if status == 'RUNNING' else 'did not finish'}): the table is the one an invocation of "
              "it logged last", file=sys.stderr)
    return parents[0].info.run_id


def table_from_experiment(name: str, tracking_uri: str) -> pd.DataFrame:
    """The results table of the experiment's most recent study (parent) run."""
    with store_errors(tracking_uri):
        client = open_store(tracking_uri)
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
                                     description="Rebuild a study's results table (results.csv) and report from its "
                                                 "MLflow store alone.")
    parser.add_argument("--experiment", required=True, help="MLflow experiment (study) name: its latest study run")
    parser.add_argument("--tracking-uri", default="sqlite:///runs/mlflow.db")
    parser.add_argument("--out", required=True, help="output folder")
    args = parser.parse_args(argv)
    out = Path(args.out)

    def write() -> Path:
        table = table_from_experiment(args.experiment, args.tracking_uri)
        out.mkdir(parents=True, exist_ok=True)
        results.write(table, out / "results.csv")  # the table itself, as the study wrote it (what compare reads)
        return report.write_report(table, out, title=args.experiment)

    code = report.report_command(write, out)
    if code == 0:
        print(f"results: {out / 'results.csv'}")
    return code


if __name__ == "__main__":
    from study.cli import exit_now

    exit_now(main())

"""The results table read back from a study's MLflow store: the `results.csv` its latest parent run holds."""

import time

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from analysis import results
from pipelines.config import UserError
from pipelines.downstream import Measurement
from study.mlflow_source import main, table_from_experiment
from study.tracking import ROLE_TAG


def _table(value: float) -> pd.DataFrame:
    fields = {"model": "ViT-Pico/4", "family": "ViT", "subset_size": 256, "examples_seen": 768,
              "pretrain_flops": 5e10, "seed": 0}
    return results.build_table(results.rows(fields, [Measurement("fewshot", "shapes-novel", 5, "top1", value, 0.1),
                                                     Measurement("finetune", "shapes-novel", None, "top1", 20.0)]))


def test_the_latest_study_run_s_table_is_read_back_unchanged(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("toy", artifact_location=(tmp_path / "artifacts").as_uri())
    for value in (10.0, 12.5):  # two invocations with --fresh: the newer parent run counts
        run = client.create_run(experiment, tags={ROLE_TAG: "parent"})
        results.write(_table(value), tmp_path / "results.csv")
        client.log_artifact(run.info.run_id, str(tmp_path / "results.csv"))
        time.sleep(0.01)  # distinct start times (milliseconds)
    pd.testing.assert_frame_equal(table_from_experiment("toy", uri), results.read(tmp_path / "results.csv"))
    assert table_from_experiment("toy", uri)["value"].tolist() == [12.5, 20.0]
    with pytest.raises(UserError, match="experiments there: .*toy"):
        table_from_experiment("other", uri)
    assert main(["--experiment", "other", "--tracking-uri", uri, "--out", str(tmp_path / "report")]) == 2
    # The command writes the table itself beside the report (what `compare` and `report` read back)
    assert main(["--experiment", "toy", "--tracking-uri", uri, "--out", str(tmp_path / "rebuilt")]) == 0
    rebuilt = results.read(tmp_path / "rebuilt" / "results.csv")
    pd.testing.assert_frame_equal(rebuilt, results.read(tmp_path / "results.csv"))
    assert (tmp_path / "rebuilt" / "report.md").is_file()


def test_a_store_that_is_not_there_is_one_line_and_nothing_is_made(tmp_path, capsys, monkeypatch):
    """MLflow would make a missing sqlite store (and its folders) and find no study in it; a scheme it does not
    take, or a server it cannot reach, would be a traceback."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.db").write_text("mine")
    (tmp_path / "empty.db").touch()
    cases = {None: "no MLflow store at runs/mlflow.db (sqlite:///runs/mlflow.db); a study's is its --out",
             f"sqlite:///{tmp_path}/nope/mlflow.db": f"no MLflow store at {tmp_path}/nope/mlflow.db (sqlite:",
             "sqlite:///empty.db": "no MLflow store at empty.db (sqlite:///empty.db)",
             "sqlite:///notes.db": "sqlite:///notes.db: notes.db is not an SQLite database",
             str(tmp_path / "mlruns"): f"--tracking-uri {tmp_path / 'mlruns'}: a folder (file) store, which MLflow 3 "
                                       "opens only with MLFLOW_ALLOW_FILE_STORE=true",
             "foo://bar": "--tracking-uri foo://bar: MLflow takes no 'foo://' store; give one of ",
             "http://127.0.0.1:1": "cannot reach the MLflow tracking server at http://127.0.0.1:1 (Connection refused)"}
    for uri, line in cases.items():
        argv = ["--experiment", "smoke", "--out", str(tmp_path / "report")]
        assert main(argv + (["--tracking-uri", uri] if uri else [])) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {line}") and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.db", "notes.db"]
    assert (tmp_path / "notes.db").read_text() == "mine" and (tmp_path / "empty.db").stat().st_size == 0

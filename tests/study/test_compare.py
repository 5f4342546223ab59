"""`study.compare` on a real smoke study, read from its MLflow experiment and from its folder: the report lands on
the study's parent run. Unit tests of the comparison itself: tests/analysis/test_compare.py."""

import json
import re

import pytest
from mlflow.tracking import MlflowClient

from study import compare
from tests.conftest import ROOT


def test_mlflow_input_spellings():
    assert compare.experiment_of("mlflow:sqlite:///a/b.db#smoke", "x") == ("sqlite:///a/b.db", "smoke")
    assert compare.experiment_of("mlflow:smoke", "sqlite:///runs/mlflow.db") == ("sqlite:///runs/mlflow.db", "smoke")
    assert compare.experiment_of("runs/smoke", "x") is None


def test_help_says_what_the_comparison_does_and_what_mlflow_adds(capsys):
    from analysis import compare as analysis_compare

    with pytest.raises(SystemExit):
        compare.main(["--help"])
    shown = " ".join(capsys.readouterr().out.split("\n\n")[1].split())
    assert shown == " ".join(" ".join(module.__doc__.split("\n\n")[0].split())
                             for module in (analysis_compare, compare))
    assert shown.endswith(".")


@pytest.mark.slow
def test_compare_a_smoke_study_from_mlflow_and_from_its_folder(smoke, tmp_path, capsys):
    """`main` as the command line calls it, in this process (a Python start would cost ~8 s of imports)."""
    runs, proc = smoke
    assert proc.returncode == 0, proc.stderr[-3000:]
    uri = f"sqlite:///{runs / 'mlflow.db'}"
    out = tmp_path / "cmp"
    code = compare.main([f"mlflow:{uri}#smoke", "--label", "from-mlflow", str(runs / "smoke"),  # options between
                         str(ROOT / "configs" / "published" / "vit_bit_imagenet.csv"),
                         "--label", "from-folder", "--label", "published", "--out", str(out)])
    assert code == 0, capsys.readouterr().err[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["crossovers"]["from-mlflow"] == summary["crossovers"]["from-folder"]  # the same table
    fewshot = [e for e in summary["evaluations"] if e["eval"] == "fewshot"]
    assert fewshot and all(e["missing"] == ["published"] for e in fewshot)
    client = MlflowClient(uri)
    (parent,) = client.search_runs([client.get_experiment_by_name("smoke").experiment_id],
                                   "tags.study_role = 'parent'")
    (folder,) = [a.path for a in client.list_artifacts(parent.info.run_id, "comparisons")]
    assert re.fullmatch(r"comparisons/cmp-\d{8}-\d{6}", folder)  # a later `cmp` is kept apart
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, folder)}
    assert {f"{folder}/report.md", f"{folder}/report.html", f"{folder}/summary.json"} <= logged

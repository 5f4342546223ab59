"""README "Add an evaluation", run: its module and its row, added to the evaluations table and nothing else, in
the smoke study (real Ray, real MLflow). The driver appends the row in its own process (the study runs as a
subprocess, like every end-to-end test); the trials, in Ray's worker processes, get it inside the parsed config."""

import re

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import ROOT, run_cli

pytestmark = pytest.mark.slow

README = (ROOT / "README.md").read_text()
SECTION = README[README.index("## Add an evaluation"):]
MODULE, ROW = re.findall(r"```python\n(.*?)```", SECTION, re.S)[:2]
DRIVER = ("import sys; from pipelines import evaluations; "
          "evaluations.TABLE += (evaluations.Evaluation('nearest_mean', 'nearest_mean', evaluations.FEATURES),); "
          "from study.run import main; sys.exit(main(sys.argv[1:]))")


def test_the_readme_evaluation_reaches_the_results_mlflow_and_the_report(tmp_path, cache_dir, monkeypatch):
    assert MODULE.startswith("# pipelines/evaluations/nearest_mean.py")
    assert ROW.strip() == 'Evaluation("nearest_mean", "pipelines.evaluations.nearest_mean", FEATURES),'
    (tmp_path / "toy").mkdir()
    (tmp_path / "toy" / "nearest_mean.py").write_text(MODULE)  # the module, importable by name everywhere
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path / 'toy'}:{ROOT}")
    out = tmp_path / "runs"
    proc = run_cli(["-c", DRIVER, "--grid", "configs/smoke.yaml", "--out", str(out), "models=[ViT-Pico/4]",
                    "data.subsets=[256]", "evaluate.linear_probe=null", "evaluate.finetune=null",
                    "evaluate.nearest_mean.normalize=false"], cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = pd.read_csv(out / "smoke" / "results.csv")
    toy = table[table["eval"] == "nearest_mean"]
    assert len(toy) == 1 and set(toy["metric"]) == {"top1"} and toy["value"].between(0, 100).all()
    assert set(toy["dataset"]) == {"shapes-novel"} and sorted(toy["subset_size"]) == [256]
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("smoke").experiment_id], "tags.study_role = 'point'")
    logged = {r.data.params["subset_size"]: r.data.metrics["nearest_mean/shapes-novel/top1"] for r in runs}
    assert logged == {str(n): float(f"{v:.4g}") for n, v in zip(toy["subset_size"], toy["value"], strict=True)}
    assert all(len(r.data.tags["eval_nearest_mean/shapes-novel"]) == 16 for r in runs)  # its own, per task
    assert "nearest_mean / shapes-novel" in (out / "smoke" / "report.md").read_text()

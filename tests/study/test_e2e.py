"""The smoke study end to end: real Ray, real MLflow (SQLite store), real torch; no mocks."""

import json
import re

import pandas as pd
import psutil
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import ROOT, checkpointed, run_cli, start_cli, wait_until

pytestmark = pytest.mark.slow


def _titled(proc: psutil.Process, title: str) -> bool:
    try:
        return " ".join(proc.cmdline()).startswith(title)
    except psutil.Error:
        return False


def test_study_finishes_and_prints_where_everything_is(smoke):
    out, proc = smoke
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"mlflow ui --backend-store-uri sqlite:///\S+mlflow.db", proc.stdout)
    assert re.search(r"^runs: +http://127.0.0.1:5000/#/experiments/\d+/runs\?workflowType=machine_learning&"
                     r"viewStateShareKey=study$", proc.stdout, re.M)
    assert "results:" in proc.stdout and "report:" in proc.stdout and "storage:" in proc.stdout
    verdict = json.loads((out / "smoke" / "summary.json").read_text())["verdict"]  # the console ends with it
    said = [verdict["sentence"], *(f"Caveat: {c}" for c in verdict["caveats"])]
    assert proc.stdout.rstrip().splitlines()[-len(said):] == said and "5-shot top-1" in verdict["sentence"]
    timings = json.loads((out / "smoke" / "timings.json").read_text())
    assert timings["points_ran"] == 4 and len(timings["per_point_s"]) == 4
    assert {"ray_start", "trials", "report"} <= set(timings["driver_wall_s"])
    stages = {"data", "pretrain", "diagnostics", "fewshot", "linear_probe", "finetune"}
    assert all(set(point) == stages and point["pretrain"] > 0 for point in timings["per_point_s"].values())
    assert timings["trial_s"]["finetune"] == pytest.approx(sum(p["finetune"] for p in timings["per_point_s"].values()))
    assert re.search(r"^time \(s\): connect \d+, prepare_data \d+, ray_start \d+, trials \d+, report \d+ \| summed "
                     r"over 4 trials: ", proc.stdout, re.M)
    # Of Tune's own per-trial logs only result.json (what Tune reads back): no CSV, no TensorBoard events.
    logged = {p.name for p in (out / "smoke" / "storage" / "tune").rglob("*") if p.is_file()}
    assert "result.json" in logged and "progress.csv" not in logged
    assert not [n for n in logged if n.startswith("events.out.tfevents")], logged


def test_the_console_shows_each_trials_stages_and_an_eta_instead_of_tunes_table(smoke):
    _, proc = smoke
    out = proc.stdout
    assert not re.search(r"Trial status|== Status ==|Trial name|tensorboard|[╭+]--", out, re.I), out[-3000:]
    assert "performance bottleneck" not in proc.stderr  # the study's Tune callback never holds Tune's loop
    assert "Token authentication is enabled" not in out + proc.stderr  # Ray's note at every local start: not news
    for name in (f"{model}_n{n}_s0" for model in ("ViT-Pico-4", "BiT-R14-Pico") for n in (256, 1024)):
        line = rf"^\d\d:\d\d:\d\d {name}  "
        assert re.search(line + r"started: 12 pretraining steps on cpu$", out, re.M)
        evaluations = (f"{kind} on shapes-novel" for kind in ("fewshot", "linear_probe", "finetune"))
        for stage in ("pretrain", *evaluations, "diagnostics"):
            assert re.search(line + rf"{stage}: started", out, re.M), stage  # an evaluation names its task
        assert re.search(line + r"pretrain: step \d+/12 \(\d+%\), loss [\d.]+, [\d,]+ images/s, eta \d:\d\d:\d\d$",
                         out, re.M)
        assert re.search(line + r"finetune on shapes-novel: step \d+/\d+ \(\d+%\), loss [\d.]+, [\d,]+ images/s, "
                                r"eta \d:\d\d:\d\d$", out, re.M)  # the sweep's steps: no curve logs them
        assert re.search(line + r"finished in \d:\d\d:\d\d: fewshot 1-shot [\d.]+%, .*images/s$", out, re.M)
    assert re.search(r"^\d\d:\d\d:\d\d study: [1-3] of 4 done, \d running, \d pending, [\d,]+ images/s, "
                     r"eta >?\d:\d\d:\d\d \(\d:\d\d:\d\d elapsed\)$", out, re.M)
    assert re.search(r"^\d\d:\d\d:\d\d study: 4 of 4 done, 0 running, 0 pending, .*eta 0:00:00", out, re.M)


def test_mlflow_has_one_parent_and_a_finished_child_per_grid_point(smoke):
    out, _ = smoke
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("smoke")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 4
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert {(c.data.params["model"], c.data.params["subset_size"]) for c in children} == {
        ("ViT-Pico/4", "256"), ("ViT-Pico/4", "1024"), ("BiT-R14-Pico", "256"), ("BiT-R14-Pico", "1024")}
    for child in children:
        assert child.info.status == "FINISHED"
        m, p = child.data.metrics, child.data.params
        assert {"fewshot_1shot_top1", "fewshot_5shot_top1", "finetune_top1", "pretrain_flops", "pretrain/val_top1",
                "examples_seen"} <= set(m)
        assert m["examples_seen"] == 768 and len(p["manifest_hash"]) == 16 and p["world_size"] == "1"
        assert p["pretrain.lr"] == "0.001" and "git_commit" in child.data.tags
        assert p["evaluate.fewshot.shots"] == "[1, 5]" and p["downstream.shapes-novel.size"] == "160"  # the recipe
        assert {k: child.data.tags[k] for k in ("model", "family", "subset_size", "seed")} == {
            k: p[k] for k in ("model", "family", "subset_size", "seed")}
        assert child.data.tags["mlflow.runColor"].startswith("#")
        assert all(v.is_integer() or v == float(f"{v:.4g}") for v in m.values())  # rounded as the UI shows them
        assert child.data.tags["complete"] == "1" and len(child.data.tags["point_id"]) == 16
        assert any(k.startswith("system/") and k.endswith("/cpu_utilization_percentage") for k in m)  # per node
        assert m["pretrain/images_per_s"] > 0 and "pretrain/step_time_s" in m  # measured per trial
        history = client.get_metric_history(child.info.run_id, "pretrain/loss")
        steps = {h.step for h in history}  # at the global step, every log_every (5) steps and at epoch ends
        assert {5, 10, 12} <= steps and all(s > 0 for s in steps)
        system = next(k for k in m if k.startswith("system/") and k.endswith("/cpu_utilization_percentage"))
        assert {h.step for h in client.get_metric_history(child.info.run_id, system)} == steps
        curve = client.get_metric_history(child.info.run_id, "finetune/shapes-novel/val_top1")
        assert [h.step for h in curve] == list(range(1, len(curve) + 1)) and len(curve) >= 1
        # The same curves kept in storage, for an invocation that logs the point from there (`CurveLog`)
        stored = json.loads((out / "smoke" / "storage" / "points" / child.data.tags["point_id"] /
                             "curves.json").read_text())
        assert {int(s) for s in stored["pretrain"]} == steps and len(stored["finetune/shapes-novel"]) == len(curve)
        assert [stored["pretrain"][str(h.step)]["loss"] for h in history] == pytest.approx(
            [h.value for h in history], rel=1e-3)  # (MLflow's are rounded to 4 digits)
        assert {"linear_probe/shapes-novel/top1", "finetune/shapes-novel/macro_f1", "linear_probe/shapes-novel/l2",
                "finetune/shapes-novel/lr", "diagnostics/pretrain/rf_stage1" if p["family"] == "BiT" else
                "diagnostics/pretrain/posemb_locality"} <= set(m)
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert any(a.startswith("fig7_") for a in artifacts) == (p["family"] == "ViT")
        assert {"record.json", "class_counts.json", "model"} <= artifacts
        assert {a.path for a in client.list_artifacts(child.info.run_id, "model")} == {
            "model/pretrained.safetensors", "model/model.json"}
    hashes = {(c.data.params["subset_size"], c.data.params["manifest_hash"]) for c in children}
    assert len(hashes) == 2  # both models trained on the same subset of each size
    assert len({c.data.tags["mlflow.runColor"] for c in children}) == 2  # one colour per model


def test_the_parent_run_carries_the_comparison(smoke):
    """Per model and evaluation, the mean over seeds stepped by subset size (the run's charts are Figs 3-4); the
    verdict as its description; the report and figures as artifacts; the experiment's runs-table view."""
    out, _ = smoke
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("smoke")
    parent = client.search_runs([exp.experiment_id], "tags.study_role = 'parent'")[0]
    table = pd.read_csv(out / "smoke" / "results.csv")
    fewshot = table[(table["eval"] == "fewshot") & (table["shots"] == 5) & (table["model"] == "ViT-Pico/4")]
    history = client.get_metric_history(parent.info.run_id, "fewshot/shapes-novel/5shot_top1/ViT-Pico-4")
    assert {h.step: h.value for h in history} == {
        int(n): float(f"{v:.4g}") for n, v in fewshot.groupby("subset_size")["value"].mean().items()}
    assert {f"finetune/shapes-novel/top1/{m}" for m in ("ViT-Pico-4", "BiT-R14-Pico")} <= set(parent.data.metrics)
    note = parent.data.tags["mlflow.note.content"]
    assert "ViT-Pico/4 vs BiT-R14-Pico" in note
    sentence = json.loads((out / "smoke" / "summary.json").read_text())["verdict"]["sentence"]
    assert sentence in note and sentence in smoke[1].stdout  # the answer, where a researcher looks first
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"report.md", "results.csv", "summary.json", "figures"} <= artifacts
    assert "figures/fig4_fewshot_vs_data.png" in {a.path for a in client.list_artifacts(parent.info.run_id,
                                                                                           "figures")}
    view = json.loads(exp.tags["mlflow.sharedViewState.study"])
    assert view["selectedColumns"][:3] == ["metrics.`fewshot_1shot_top1`", "metrics.`fewshot_5shot_top1`",
                                           "metrics.`finetune_top1`"]


def test_results_table_and_figures(smoke):
    out, _ = smoke
    study_dir = out / "smoke"
    table = pd.read_csv(study_dir / "results.csv")
    assert list(table.columns) == ["model", "family", "subset_size", "examples_seen", "pretrain_flops", "eval",
                                   "dataset", "shots", "metric", "value", "spread", "seed", "chance"]
    upstream = table[table["eval"] == "upstream"]  # each point's held-out pretraining top-1; chance: 16 classes
    assert len(upstream) == 4 and (upstream["dataset"] == "pretrain").all() and (upstream["chance"] == 6.25).all()
    evals = table[~table["eval"].isin(["diagnostics", "upstream"])]
    # 4 trials x (1- and 5-shot top-1 + linear probe top-1/macro-F1/chosen l2 + fine-tune top-1/macro-F1/chosen lr)
    assert len(evals) == 4 * (2 + 3 + 3)
    assert set(evals["eval"]) == {"fewshot", "linear_probe", "finetune"}
    assert set(evals["family"]) == {"ViT", "BiT"} and set(evals["metric"]) == {"top1", "macro_f1", "l2", "lr"}
    assert evals[evals["metric"].isin(["top1", "macro_f1"])]["value"].between(0, 100).all()
    assert set(evals[evals["metric"] == "lr"]["value"]) <= {0.001, 0.003, 0.01, 0.03}  # the sweep's choice
    assert set(evals[evals["metric"] == "l2"]["value"]) <= {1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1}
    fewshot = evals[evals["eval"] == "fewshot"]  # the spread over the repeated k-shot draws travels with the mean
    assert fewshot["spread"].notna().all() and evals[evals["eval"] != "fewshot"]["spread"].isna().all()
    top1 = evals["metric"] == "top1"
    assert (evals[top1]["chance"] == 12.5).all() and evals[~top1]["chance"].isna().all()  # 8 downstream classes
    # Fig 7 numbers: ViT-Pico/4 has 4 layers (mean + min), a locality and the uniform-attention reference; the
    # ResNet a receptive field per stage.
    diag = table[table["eval"] == "diagnostics"]
    assert len(diag) == 2 * (4 * 2 + 2) + 2 * 4
    rf = diag[diag["metric"] == "rf_stage4"]["value"]
    assert (rf == 19).all() and diag[diag["metric"] == "posemb_locality"]["value"].between(-1, 1).all()
    assert (study_dir / "figures" / "fig7_ViT-Pico-4_n256_vs_n1024.png").exists()
    assert (study_dir / "figures" / "fig7_vit_diagnostics_vs_data.pdf").exists()
    for name in ("fig3_finetune_vs_data", "fig4_fewshot_vs_data"):
        for ext in ("png", "pdf"):
            assert (study_dir / "figures" / f"{name}.{ext}").stat().st_size > 5000
    # 12 steps at every size: compute is fixed per model, so no Fig 5, and the verdict says why.
    assert not (study_dir / "figures" / "fig5_accuracy_vs_compute.png").exists()
    report = (study_dir / "report.md").read_text()
    assert "fig4_fewshot_vs_data.png" in report and "| ViT-Pico/4 |" in report
    summary = json.loads((study_dir / "summary.json").read_text())["verdict"]
    assert any(c.startswith("compute is fixed per model") for c in summary["caveats"])
    assert report.split("\n")[2] == f"**{summary['sentence']}**"  # the answer right under the title


def test_diverging_trials_fail_with_a_reason_and_the_study_carries_on(tmp_path, cache_dir):
    proc = run_cli(["-m", "study.run", "--grid", "configs/smoke.yaml", "--out", str(tmp_path),
                    "pretrain.lr=1.0e+30", "models=[ViT-Pico/4]", "data.subsets=[256]"], cache_dir)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "trials failed" in proc.stderr and "TrainingDiverged" in proc.stderr
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    child = next(r for r in runs if "mlflow.parentRunId" in r.data.tags)
    assert child.info.status == "FAILED" and "loss became" in child.data.tags["failure_reason"]
    parent = next(r for r in runs if r.info.run_id == child.data.tags["mlflow.parentRunId"])
    assert parent.info.status == "FAILED" and parent.data.tags["failed_points"] == "1 of 1"  # not FINISHED


def test_a_killed_trial_restarts_from_its_checkpoint_in_the_same_mlflow_run(tmp_path, cache_dir):
    """SIGKILL the trial's Ray worker after its first checkpoint: Tune's FailureConfig restarts it, it resumes
    from that checkpoint (not from scratch), and its MLflow child run is reused, not duplicated."""
    import os
    import signal
    import subprocess

    # 60 steps: the first checkpoint (step 10) comes with 50 steps still to go, so the kill lands mid-pretraining.
    args = ["-m", "study.run", "--grid", "configs/smoke.yaml", "--out", str(tmp_path), "models=[ViT-Pico/4]",
            "data.subsets=[1024]", "pretrain.steps=60", "pretrain.checkpoint_every=10", "evaluate.linear_probe=null",
            "evaluate.finetune=null", "evaluate.diagnostics=null"]
    proc = start_cli(args, cache_dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    wait_until(proc, lambda: checkpointed(tmp_path), "a checkpoint in storage")
    # This study's trial process (its Ray is the driver's child): the trial's DataLoader worker is forked from it
    # and shares its title, so kill the one whose parent is not a match.
    found = [p for p in psutil.Process(proc.pid).children(recursive=True) if _titled(p, "ray::ImplicitFunc")]
    workers = [p for p in found if p.ppid() not in {f.pid for f in found}]
    assert len(workers) == 1
    os.kill(workers[0].pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 1 and children[0].info.status == "FINISHED"
    resumed = client.get_metric_history(children[0].info.run_id, "resumed_from_step")
    assert resumed and 10 <= resumed[0].value < 60 and resumed[0].value % 10 == 0


def test_the_readme_snippet_loads_a_points_weights_from_mlflow(smoke):
    """The README's snippet, run as written: a finished point's weights from the tracking store alone."""
    import torch

    out, _ = smoke
    readme = (ROOT / "README.md").read_text()
    snippet = readme.split("<!-- weights-snippet", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    child = next(r for r in client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
                 if r.data.params.get("model") == "ViT-Pico/4" and r.data.params.get("subset_size") == "256")
    scope = {"RUN_ID": child.info.run_id, "TRACKING_URI": f"sqlite:///{out / 'mlflow.db'}"}
    exec(snippet, scope)  # noqa: S102
    stored = out / "smoke" / "storage" / "points" / child.data.tags["point_id"] / "pretrained.safetensors"
    from safetensors.torch import load_file
    expected = load_file(str(stored))
    loaded = scope["model"].state_dict()
    assert set(loaded) == set(expected) and all(torch.equal(loaded[k], expected[k]) for k in expected)
    assert scope["model"](torch.zeros(1, 3, 32, 32)).shape == (1, 16)


def test_the_readmes_weights_snippet_builds_a_recipes_options_and_loads_the_selected_steps_weights(tmp_path):
    """A point whose recipe changes the model (`pool: gap`, no class token) and selects its best step: the snippet
    builds that model, and loads the weights the evaluations used (`best.safetensors`), not the last step's. A real
    MLflow store, the artifacts as the study logs them (`PointFiles.logged`)."""
    import torch
    from safetensors.torch import save_file

    from pipelines import models

    options = models.ModelOptions(pool="gap", weight_init="jax")
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.json").write_text(json.dumps({"model": "ViT-Pico/4", "num_classes": 16, "image_size": 32,
                                                   "options": options.changed()}))
    best, last = (models.build("ViT-Pico/4", 16, 32, options).state_dict() for _ in range(2))
    save_file(best, folder / "best.safetensors")
    save_file(last, folder / "pretrained.safetensors")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("x", artifact_location=(tmp_path / "art").as_uri()))
    client.log_artifacts(run.info.run_id, str(folder), "model")
    readme = (ROOT / "README.md").read_text()
    snippet = readme.split("<!-- weights-snippet", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    scope = {"RUN_ID": run.info.run_id, "TRACKING_URI": uri}
    exec(snippet, scope)  # noqa: S102
    loaded = scope["model"].state_dict()
    assert "cls_token" not in loaded and all(torch.equal(loaded[k], best[k]) for k in best)
    assert not all(torch.equal(loaded[k], last[k]) for k in last)


def test_a_grid_that_leaves_out_finished_points_is_refused_and_the_study_s_report_kept(smoke, tmp_path, cache_dir):
    """A changed recipe under the same study and --out: every finished point would drop out of the report, the
    verdict and the MLflow parent. One line naming what changed and the ways on, exit 2; nothing rewritten."""
    import shutil

    from tests.conftest import mlflow_statuses

    out = tmp_path / "runs"
    shutil.copytree(smoke[0], out)  # its store and storage (the experiment's artifacts stay where they were)
    before = {name: (out / "smoke" / name).read_bytes() for name in ("results.csv", "report.md", "config.yaml")}
    proc = run_cli(["-m", "study.run", "--grid", "configs/smoke.yaml", "--out", str(out), "pretrain.lr=0.01"],
                   cache_dir)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert errors[0].startswith("error: study 'smoke' has 4 finished points this grid leaves out (changed since: "
                                "pretrain.lr: 0.001 -> 0.01); its report, verdict and MLflow parent would then show "
                                "this grid alone."), errors[0]
    assert "--replace" in errors[0] and "study=NAME" in errors[0]
    assert {name: (out / "smoke" / name).read_bytes() for name in before} == before
    assert mlflow_statuses(out) == ("FINISHED", ["FINISHED"] * 4)
    changed = ["-m", "study.run", "--grid", "configs/smoke.yaml", "--out", str(out), "pretrain.lr=0.01", "--dry-run"]
    dry = run_cli(changed, cache_dir)  # the dry run says so too
    assert dry.returncode == 2 and dry.stderr.strip().splitlines()[-1] == errors[0], dry.stderr[-2000:]
    assert run_cli([*changed, "--replace"], cache_dir).returncode == 0

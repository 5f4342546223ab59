"""Rerunning the study command resumes, extends and re-evaluates (real Ray, real MLflow, no mocks).

One output folder goes through six invocations: a driver SIGKILLed mid-study, the same command again, a grid with
one more subset size, the same again with two points left unclosed in MLflow, a changed few-shot protocol, and
another storage with a second downstream task.
"""

import json
import os
import re
import signal
import subprocess
import time

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import ROOT, run_cli, start_cli, wait_until

pytestmark = pytest.mark.slow

# 24 steps: the killed invocation's second point has its first checkpoint (step 4) with 20 steps still to go; the
# driver dies within a poll (0.2 s) of it, a step or two later.
BASE = ["-m", "study.run", "--grid", "configs/smoke.yaml", "pretrain.steps=24", "pretrain.checkpoint_every=4",
        "evaluate.finetune.steps=4", "evaluate.finetune.lr=0.01"]
# Only the killed invocation runs one trial at a time (so that, when it dies, two points have not started); how many
# trials run at once is not part of any identity, so the later invocations run two side by side on 2 cores.
ONE_AT_A_TIME = "resources.max_concurrent_trials=1"
ACTIONS = re.compile(r"^(\S+)\s+([\d,]+)\s+(\d+)\s+[\d,]+(?:\s+[\d.e+-]+)+\s+(reuse|log|evaluate.*|resume|train)$",
                     re.M)  # the grid's rows: model, subset, seed, examples, the numeric columns, what this run does


def _actions(stdout: str) -> dict[tuple[str, int], str]:
    return {(m[1], int(m[2].replace(",", ""))): m[4] for m in ACTIONS.finditer(stdout)}


def _dry_run(out, overrides: list[str], cache_dir, monkeypatch, capsys) -> str:
    """`BASE ... --dry-run` through `main`, in this process (a Python start would cost ~8 s of imports): its stdout."""
    from study.run import main

    monkeypatch.setenv("VITSCALE_CACHE", str(cache_dir))
    monkeypatch.chdir(ROOT)
    capsys.readouterr()
    assert main([*BASE[2:], "--out", str(out), *overrides, "--dry-run"]) == 0
    return capsys.readouterr().out


def _points(out):
    return {p.name: p for p in (out / "smoke" / "storage" / "points").iterdir()}


def _finished(out) -> list[str]:
    done = []
    for name, folder in _points(out).items():
        record = folder / "record.json"
        if record.exists() and len(json.loads(record.read_text())["evals"]) == 4:
            done.append(name)
    return done


def _client(out):
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    return client, client.get_experiment_by_name("smoke").experiment_id


def _children(out):
    client, exp = _client(out)
    runs = client.search_runs([exp])
    parents = [r for r in runs if r.data.tags.get("study_role") == "parent"]
    return parents, [r for r in runs if r.data.tags.get("study_role") == "point"]


def _pretrain_entries(out) -> dict:
    """Per child run, how many entries each pretraining metric has."""
    client, _ = _client(out)
    return {c.info.run_id: {k: len(client.get_metric_history(c.info.run_id, k)) for k in c.data.metrics
                            if k.startswith("pretrain/")} for c in _children(out)[1]}


@pytest.fixture(scope="module")
def killed(tmp_path_factory, cache_dir):
    """SIGKILL the driver once one point has finished and another has a checkpoint in storage."""
    out = tmp_path_factory.mktemp("idem")
    proc = start_cli([*BASE, ONE_AT_A_TIME, "--out", str(out)], cache_dir, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL)
    state = {}

    def one_done_one_halfway() -> bool:
        points = _points(out) if (out / "smoke" / "storage" / "points").exists() else {}
        state["done"] = done = _finished(out) if points else []
        state["halfway"] = [n for n, f in points.items()
                            if n not in done and list(f.glob("checkpoints/ckpt-*/state.pt"))]
        return bool(done and state["halfway"])

    wait_until(proc, one_done_one_halfway, "one point finished and another checkpointed")
    done, halfway = state["done"], state["halfway"]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(3)  # Ray's processes notice their driver is gone
    return out, done, halfway


@pytest.fixture(scope="module")
def rerun(killed, cache_dir):
    out, done, halfway = killed
    start = time.monotonic()
    proc = run_cli([*BASE, "--out", str(out)], cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, time.monotonic() - start


def test_a_killed_driver_leaves_nothing_that_blocks_the_next_run(killed, rerun):
    out, done, halfway = killed
    proc, _ = rerun
    actions = _actions(proc.stdout)
    assert len(actions) == 4
    assert sorted(actions.values()).count("train") == 2, actions  # the two points that never started
    assert sum(a in ("reuse", "log") for a in actions.values()) == 1, actions  # the finished one: not again
    assert sorted(actions.values()).count("resume") == 1, actions  # the half-done one, from its checkpoint
    parents, children = _children(out)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 4 and {c.info.status for c in children} == {"FINISHED"}
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    by_point = {c.data.tags["point_id"]: c for c in children}
    assert by_point[halfway[0]].data.metrics["resumed_from_step"] > 0
    client, _ = _client(out)
    for child in children:  # a resumed point logs no (key, step) twice
        steps = [h.step for h in client.get_metric_history(child.info.run_id, "pretrain/loss")]
        assert steps and len(steps) == len(set(steps)), steps


@pytest.fixture(scope="module")
def extended(rerun, killed, cache_dir):
    out = killed[0]
    _, before = _children(out)
    proc = run_cli([*BASE, "--out", str(out), "data.subsets=[256, 1024, 2048]"], cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, {c.info.run_id: c.info.end_time for c in before}


def test_extending_the_grid_trains_exactly_the_new_points(killed, extended):
    out = killed[0]
    proc, old_end_times = extended
    actions = _actions(proc.stdout)
    assert {k: a for k, a in actions.items() if a != "reuse"} == {("ViT-Pico/4", 2048): "train",
                                                                  ("BiT-R14-Pico", 2048): "train"}
    _, children = _children(out)
    assert len(children) == 6 and {c.info.status for c in children} == {"FINISHED"}
    assert {c.info.run_id: c.info.end_time for c in children if c.info.run_id in old_end_times} == old_end_times
    table = pd.read_csv(out / "smoke" / "results.csv")
    assert set(zip(table["model"], table["subset_size"], strict=True)) == {
        (m, n) for m in ("ViT-Pico/4", "BiT-R14-Pico") for n in (256, 1024, 2048)}


def test_points_finished_in_storage_but_not_closed_in_mlflow_end_with_one_finished_child(killed, extended, cache_dir):
    """The moments a SIGKILL of the driver can leave, put on two of the study's points: the point's pretraining and
    evaluations are in storage, its child is still RUNNING and not marked complete (the next run logs it and closes
    it FINISHED, and nothing marks it KILLED afterwards), or marked complete but still RUNNING (the next run reuses
    it and closes it FINISHED, not KILLED: it is complete)."""
    out = killed[0]
    client, (_, children) = _client(out)[0], _children(out)
    unlogged, unclosed = sorted(children, key=lambda c: c.data.tags["point_id"])[:2]
    client.delete_tag(unlogged.info.run_id, "complete")
    for child in (unlogged, unclosed):  # as the killed driver left them
        client.update_run(child.info.run_id, status="RUNNING")
    proc = run_cli([*BASE, "--out", str(out), "data.subsets=[256, 1024, 2048]"], cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    point = {c.info.run_id: (c.data.params["model"], int(c.data.params["subset_size"])) for c in children}
    actions = _actions(proc.stdout)
    assert actions.pop(point[unlogged.info.run_id]) == "log" and actions.pop(point[unclosed.info.run_id]) == "reuse"
    assert set(actions.values()) == {"reuse"}, actions
    _, after = _children(out)
    assert {c.info.run_id: c.info.status for c in after} == {c.info.run_id: "FINISHED" for c in children}
    assert all(c.data.tags["complete"] == "1" for c in after)
    steps = [h.step for h in client.get_metric_history(unlogged.info.run_id, "pretrain/loss")]
    assert steps and len(steps) == len(set(steps)), steps  # logged again: no (key, step) twice


def test_a_changed_evaluation_reevaluates_without_pretraining(killed, extended, cache_dir, monkeypatch, capsys):
    out = killed[0]
    before = _pretrain_entries(out)
    proc = run_cli([*BASE, "--out", str(out), "data.subsets=[256, 1024, 2048]", "evaluate.fewshot.shots=[1, 2, 5]"],
                   cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert set(_actions(proc.stdout).values()) == {"evaluate (fewshot/shapes-novel)"}
    assert _pretrain_entries(out) == before  # no pretraining step ran
    _, children = _children(out)
    assert all("fewshot/shapes-novel/2shot_top1" in c.data.metrics for c in children)
    assert {c.info.status for c in children} == {"FINISHED"} and len(children) == 6
    table = pd.read_csv(out / "smoke" / "results.csv")
    assert sorted(table[table["eval"] == "fewshot"]["shots"].unique()) == [1, 2, 5]
    timings = json.loads((out / "smoke" / "timings.json").read_text())  # this invocation's: few-shot (and its data)
    assert "fewshot" in timings["trial_s"] and set(timings["trial_s"]) <= {"fewshot", "data"}, timings
    assert timings["points_ran"] == 6 and "pretrain" not in proc.stdout.split("time (s)")[-1]
    again = _dry_run(out, ["data.subsets=[256, 1024, 2048]", "evaluate.fewshot.shots=[1, 2, 5]"], cache_dir,
                     monkeypatch, capsys)
    assert set(_actions(again).values()) == {"reuse"}
    fresh = _dry_run(out, ["data.subsets=[256, 1024, 2048]", "--fresh"], cache_dir, monkeypatch, capsys)
    assert set(_actions(fresh).values()) == {"train"}  # --fresh ignores what is done


# The smoke study's task, then a second one.
TWO_TASKS = ("downstream=[{name: shapes-novel, source: shapes, size: 160, test_size: 160, image_size: 48, "
             "num_classes: 8, seed: 1}, {name: other, source: shapes, size: 160, test_size: 160, image_size: 48, "
             "num_classes: 8, seed: 2}]")


def test_weights_in_mlflow_serve_a_reevaluation_without_the_storage(killed, extended, cache_dir, tmp_path):
    """Another machine: an empty storage, the same tracking store. The weights come from MLflow; nothing pretrains.
    A second downstream task joins: every evaluation runs on it, and on the first task only the changed few-shot.
    --storage is a relative path: the trials write where the driver reads (not in Tune's trial folders)."""
    out = killed[0]
    before = _pretrain_entries(out)
    proc = run_cli([*BASE, "--out", str(out), "--storage", os.path.relpath(tmp_path / "elsewhere", ROOT),
                    "data.subsets=[256, 1024, 2048]", "evaluate.fewshot.shots=[1, 3]", TWO_TASKS], cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert set(_actions(proc.stdout).values()) == {
        "evaluate (fewshot/shapes-novel, fewshot/other, linear_probe/other, finetune/other)"}
    assert _pretrain_entries(out) == before  # no pretraining step ran
    assert len(list((tmp_path / "elsewhere" / "points").glob("*/pretrained.safetensors"))) == 6  # from MLflow
    timings = json.loads((out / "smoke" / "timings.json").read_text())["trial_s"]
    assert "pretrain" not in timings and "finetune" in timings, timings  # this invocation's: the weights' record
    table = pd.read_csv(out / "smoke" / "results.csv")
    assert sorted(table[table["eval"] == "fewshot"]["shots"].unique()) == [1, 3]
    finetune = table[table["eval"] == "finetune"]  # top-1, macro-F1 and the chosen lr per task
    assert finetune.groupby("dataset").size().to_dict() == {"shapes-novel": 6 * 3, "other": 6 * 3}

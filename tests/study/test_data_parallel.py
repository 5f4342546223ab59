"""A data-parallel grid point end to end (real Ray Tune + Ray Train + MLflow, gloo on this CPU machine): the smoke
study with `resources.workers_per_trial=2`, one rank SIGKILLed mid-pretraining; Train restarts the ranks, they
resume from the checkpoint in storage, and the point ends in the same MLflow child run."""

import json
import os
import signal

import pandas as pd
import psutil
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import checkpointed, start_cli, wait_until

pytestmark = pytest.mark.slow


def _train_workers() -> list[psutil.Process]:
    """The ranks' processes (their DataLoader workers are forks that carry the same title: left out)."""
    def titled(proc) -> bool:
        try:
            return " ".join(proc.cmdline()).startswith("ray::RayTrainWorker")
        except psutil.Error:
            return False

    return [p for p in psutil.process_iter() if titled(p) and not titled(p.parent())]


def test_two_ranks_per_point_survive_a_killed_rank(tmp_path, cache_dir):
    out = tmp_path / "runs"
    proc = start_cli(["-m", "study.run", "--grid", "configs/smoke.yaml", "--out", str(out),
                      "resources.workers_per_trial=2", "data.subsets=[256]", "models=[ViT-Pico/4]", "pretrain.steps=200",
                      "pretrain.checkpoint_every=4", "resources.max_concurrent_trials=1",
                      "evaluate.finetune.steps=4", "evaluate.finetune.lr=0.01", "resources.max_failures=2"],
                     cache_dir, stdout=open(tmp_path / "stdout.txt", "w"), stderr=open(tmp_path / "stderr.txt", "w"))
    try:
        wait_until(proc, lambda: checkpointed(out) and len(_train_workers()) == 2, "a checkpoint in storage")
        victim = max(_train_workers(), key=lambda p: p.pid)
        os.kill(victim.pid, signal.SIGKILL)
        assert proc.wait(timeout=600) == 0, (tmp_path / "stderr.txt").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    children = [r for r in runs if r.data.tags.get("study_role") == "point"]
    assert len(children) == 1 and all(r.info.status == "FINISHED" for r in runs)
    assert {r.data.params["world_size"] for r in children} == {"2"}
    assert all(r.data.tags.get("complete") == "1" for r in children)
    resumed = [r for r in children if r.data.metrics.get("resumed_from_step", 0) > 0]
    assert len(resumed) == 1, "the point whose rank was killed resumes from its stored checkpoint"
    assert 0 < resumed[0].data.metrics["resumed_from_step"] < 200
    steps = [m.step for m in client.get_metric_history(resumed[0].info.run_id, "pretrain/loss")]
    assert len(steps) == len(set(steps)) and max(steps) == 200  # one child, no step logged twice, run to the end
    table = pd.read_csv(out / "smoke" / "results.csv")
    assert set(table["eval"]) >= {"fewshot", "linear_probe", "finetune"}
    record = json.loads(next((out / "smoke" / "storage" / "points").glob("*/record.json")).read_text())
    assert record["pretrain"]["steps"] == 200

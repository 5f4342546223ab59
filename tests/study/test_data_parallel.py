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


def _train_workers(driver: int) -> list[psutil.Process]:
    """The ranks' processes under this study's driver (their DataLoader workers are forks that carry the same
    title: left out)."""
    def titled(proc) -> bool:
        try:
            return " ".join(proc.cmdline()).startswith("ray::RayTrainWorker")
        except psutil.Error:
            return False

    try:
        tree = psutil.Process(driver).children(recursive=True)  # its Ray is the driver's child
    except psutil.Error:
        return []
    return [p for p in tree if titled(p) and not titled(p.parent())]


def test_two_ranks_per_point_survive_a_killed_rank(tmp_path, cache_dir, monkeypatch):
    out = tmp_path / "runs"
    # Train's controller polls its workers every 2 s by default: a finished or failed rank group is seen sooner.
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    # 40 steps: the first checkpoint (step 4) comes with 36 steps still to go, so the kill lands mid-pretraining.
    proc = start_cli(["-m", "study.run", "--grid", "configs/smoke.yaml", "--out", str(out),
                      "resources.workers_per_trial=2", "data.subsets=[256]", "models=[ViT-Pico/4]",
                      "pretrain.steps=40", "pretrain.checkpoint_every=4", "resources.max_concurrent_trials=1",
                      "evaluate.finetune.steps=4", "evaluate.finetune.lr=0.01", "resources.max_failures=2",
                      # LP-FT from the shared features: the main rank's probe head handed to both ranks
                      "evaluate.finetune.head_init=probe", "evaluate.finetune.image_size=32",
                      "evaluate.finetune.val_fraction=0"],
                     cache_dir, stdout=open(tmp_path / "stdout.txt", "w"), stderr=open(tmp_path / "stderr.txt", "w"))
    try:
        wait_until(proc, lambda: checkpointed(out) and len(_train_workers(proc.pid)) == 2, "a checkpoint in storage")
        victim = max(_train_workers(proc.pid), key=lambda p: p.pid)
        os.kill(victim.pid, signal.SIGKILL)
        assert proc.wait(timeout=600) == 0, (tmp_path / "stderr.txt").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    # One line says it; the 193 lines Ray forwarded from Train's controller and cleaner (three stacks) are not printed
    assert "started again (a rank was lost; Ray Train restarted the ranks)" in (tmp_path / "stdout.txt").read_text()
    err = (tmp_path / "stderr.txt").read_text()
    assert "Traceback" not in err and "TrainController" not in err, err[-3000:]

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    children = [r for r in runs if r.data.tags.get("study_role") == "point"]
    assert len(children) == 1 and all(r.info.status == "FINISHED" for r in runs)
    assert {r.data.params["world_size"] for r in children} == {"2"}
    assert all(r.data.tags.get("complete") == "1" for r in children)
    resumed = [r for r in children if r.data.metrics.get("resumed_from_step", 0) > 0]
    assert len(resumed) == 1, "the point whose rank was killed resumes from its stored checkpoint"
    assert 0 < resumed[0].data.metrics["resumed_from_step"] < 40
    steps = [m.step for m in client.get_metric_history(resumed[0].info.run_id, "pretrain/loss")]
    assert len(steps) == len(set(steps)) and max(steps) == 40  # one child, no step logged twice, run to the end
    table = pd.read_csv(out / "smoke" / "results.csv")
    assert set(table["eval"]) >= {"fewshot", "linear_probe", "finetune"}
    record = json.loads(next((out / "smoke" / "storage" / "points").glob("*/record.json")).read_text())
    assert record["pretrain"]["steps"] == 40


def _pretrain_on_shards(config: dict) -> None:
    """One rank (or the only process): a few SGD steps on the streamed shapes subset; rank 0 saves the weights."""
    import torch
    from safetensors.torch import save_file

    from pipelines import data, distributed, pretrain
    from pipelines.data.augment import Augment
    from pipelines.data.stream import LoaderConfig
    from pipelines.runtime import Runtime

    torch.set_num_threads(1)
    src = data.SourceConfig(source="shapes", size=256, test_size=0, image_size=16, num_classes=4, seed=0)
    index = data.prepared(src, config["cache"]).index()
    cfg = pretrain.PretrainConfig(steps=5, batch_size=32, optimizer="sgd", lr=0.05, warmup_steps=1, precision="fp32",
                                  weight_decay=0.0, augment=Augment(crop="translate", crop_padding=2, flip=True),
                                  micro_batch_size=8, compile=False)
    rt = Runtime(torch.device("cpu"), loader=LoaderConfig(workers=1), progress=False)
    result = pretrain.run(cfg, config["model"], data.nested_subset(index, 128, 0), 4, 16, rt)
    if distributed.ranks().main:
        save_file(result.state_dict, config["out"])


def test_ray_train_ranks_train_to_the_parameters_of_one_process(tmp_path, cache_dir, model="ViT-Pico/4"):
    """Through Ray Train (2 workers, gloo) with the streamed, augmented shard loader and micro-batches: the same
    parameters as one process, to rtol 1e-5 (the BiT is compared without Ray in tests/pipelines)."""
    import ray
    import torch
    from ray import train
    from ray.train.torch import TorchTrainer
    from safetensors.torch import load_file

    config = {"cache": cache_dir, "model": model, "out": str(tmp_path / "one.safetensors")}
    _pretrain_on_shards(config)
    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False)  # not a `ray start` one
    try:
        TorchTrainer(_pretrain_on_shards, train_loop_config={**config, "out": str(tmp_path / "two.safetensors")},
                     scaling_config=train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                     run_config=train.RunConfig(storage_path=str(tmp_path / "storage"), name="equivalence")).fit()
    finally:
        ray.shutdown()
    one, two = load_file(str(tmp_path / "one.safetensors")), load_file(str(tmp_path / "two.safetensors"))
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


# The study's command with every trial handed a lease token other than the driver's: what the ranks of a point meet
# on a node that sees another folder at the storage's path (one that joined after the driver checked the nodes).
BLIND = """
import sys
import study.tune_runner as runner
real = runner.run_trials
def blind(cfg, plans, storage, callback, name, interrupt, verbose=False, lease_token=None):
    return real(cfg, plans, storage, callback, name, interrupt, verbose, "not the driver's token")
runner.run_trials = blind
from study.run import main
sys.exit(main(sys.argv[1:]))
"""


def test_ranks_on_a_node_that_does_not_see_the_storage_fail_the_point_once_without_a_retry(tmp_path, cache_dir):
    """Every rank checks its node before it reads anything; they agree (one all-reduce), rank 0 reports the failure
    and all return: one FAILED line, no crash retried by Train or Tune, nothing written for the point."""
    from tests.conftest import run_cli

    out = tmp_path / "out"
    proc = run_cli(["-c", BLIND, "--grid", "configs/smoke.yaml", "--out", str(out), "models=[ViT-Pico/4]",
                    "data.subsets=[256]", "resources.workers_per_trial=2"], cache_dir, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    failed = [line for line in proc.stdout.splitlines() if "ViT-Pico-4_n256_s0" in line and "FAILED" in line]
    assert len(failed) == 1 and "UserError: this node (" in failed[0] and "does not see the study's storage" in (
        failed[0]) and "another lease is there" in failed[0], proc.stdout[-3000:]
    assert "retried" not in proc.stdout and "Traceback" not in proc.stderr, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not list((out / "smoke" / "storage" / "points").glob("*/*.safetensors"))

"""One grid point in-process (`run_point`: plain Python, real storage and torch, no Ray): evaluation during
training and the step it selects."""

import os
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load as load_weights

from study.config import expand, load_study
from study.identity import eval_ids
from study.protocol import Curve
from study.storage import PointFiles, Storage
from study.trial import TrialPlan, index_root, run_point
from tests.conftest import ROOT


def test_select_best_logs_each_step_and_the_point_reports_the_chosen_steps_numbers(tmp_path, cache_dir,
                                                                                  monkeypatch):
    """On a source without a test split: upstream validation reads the slice carved from it, and only that."""
    from pipelines import data, metrics

    cfg = load_study(ROOT / "configs" / "smoke.yaml", [
        "models=[ViT-Pico/4]", "data.subsets=[256]", "pretrain.eval_every=6", f"data.cache_dir={cache_dir}",
        "data.pretrain.test_size=0", "evaluate.linear_probe=null", "evaluate.finetune=null",
        "evaluate.diagnostics=null"])
    (point,) = expand(cfg)
    read, real = [], metrics.split_batches  # upstream top-1's reads (`metrics.evaluate`): (rows asked, rows read)

    def counted(split, *args, **kwargs):
        read.append((np.asarray(split.positions).tolist(), 0))
        for batch in real(split, *args, **kwargs):
            read[-1] = (read[-1][0], read[-1][1] + len(batch))
            yield batch

    monkeypatch.setattr(metrics, "split_batches", counted)
    events, storage = [], Storage(str(tmp_path / "storage"))
    record = run_point(cfg, TrialPlan(point, "train", eval_ids(cfg)), storage, tmp_path / "scratch", events.append)
    index = data.prepared(cfg.data.pretrain, cache_dir, index_root(cfg, storage)).index()  # what the trial read
    held = data.held_out(index, 20)  # 1% of the 2,048 images
    assert read == [(np.asarray(held.positions).tolist(), 20)] * 3  # steps 6 and 12, then the kept weights' val_top1
    assert record.pretrain.val_rows == 20
    curves = {(e.prefix, e.step): e.values for e in events if isinstance(e, Curve)}
    val = {step: curves["pretrain/val", step]["top1"] for step in (6, 12)}
    shots = {step: curves["pretrain/minival_fewshot/shapes-novel", step] for step in (6, 12)}
    chosen = max((6, 12), key=lambda step: (shots[step]["5shot_top1"], -step))  # the 5-shot headline, first best
    summary = record.pretrain
    assert (summary.selected_step, summary.selected_score) == (chosen, shots[chosen]["5shot_top1"])
    assert summary.val_top1 == pytest.approx(val[chosen])  # upstream top-1 of the kept weights
    files = PointFiles(point.id)
    best, last = (load_weights(storage.read_bytes(f)) for f in (files.best_weights, files.weights))
    assert best.keys() == last.keys() and (chosen == 12) == all((best[k] == last[k]).all() for k in best)


FEWSHOT = "fewshot/shapes-novel"  # the smoke study's one downstream task


def _fewshot_and_finetune(cache_dir, *extra):
    cfg = load_study(ROOT / "configs" / "smoke.yaml", [
        "models=[ViT-Pico/4]", "data.subsets=[256]", f"data.cache_dir={cache_dir}", "evaluate.linear_probe=null",
        "evaluate.diagnostics=null", *extra])
    (point,) = expand(cfg)
    return cfg, point


def test_a_retried_trial_runs_only_the_evaluations_its_record_lacks(tmp_path, cache_dir, monkeypatch):
    """A trial retried after its worker was lost: pretraining and the evaluations the record already holds (under
    the same protocol id) are not run again; the one that was cut off is."""
    from pipelines import downstream

    cfg, point = _fewshot_and_finetune(cache_dir)
    evals, storage = eval_ids(cfg), Storage(str(tmp_path / "storage"))
    first = run_point(cfg, TrialPlan(point, "train", {FEWSHOT: evals[FEWSHOT]}), storage, tmp_path / "scratch",
                      lambda event: None)  # the attempt that ended after its few-shot evaluation
    ran, real = [], downstream.run
    monkeypatch.setattr(downstream, "run", lambda *args, **kw: ran.append(args[4]) or real(*args, **kw))
    again = run_point(cfg, TrialPlan(point, "train", evals), storage, tmp_path / "scratch", lambda event: None)
    assert ran == [("finetune",)]
    assert again.evals[FEWSHOT] == first.evals[FEWSHOT] and again.pretrain == first.pretrain
    assert set(again.evals) == {FEWSHOT, "finetune/shapes-novel"}


def test_a_task_added_to_downstream_runs_the_evaluations_on_it_alone(tmp_path, cache_dir, monkeypatch):
    """The point (whose weights no task shapes) keeps its id; its record keeps the first task's few-shot and
    fine-tune, and the evaluations run on the new task only."""
    from pipelines import downstream

    cfg, point = _fewshot_and_finetune(cache_dir)
    storage = Storage(str(tmp_path / "storage"))
    first = run_point(cfg, TrialPlan(point, "train", eval_ids(cfg)), storage, tmp_path / "scratch", lambda e: None)
    tasks = ("downstream=[{name: shapes-novel, source: shapes, size: 160, test_size: 160, image_size: 48, "
             "num_classes: 8, seed: 1}, {name: other, source: shapes, size: 160, test_size: 160, image_size: 48, "
             "num_classes: 8, seed: 2}]")  # smoke's task, then another
    two, same = _fewshot_and_finetune(cache_dir, tasks)
    assert same.id == point.id and two.downstream[0] == cfg.downstream[0]
    ran, real = [], downstream.run
    monkeypatch.setattr(downstream, "run",
                        lambda *args, **kw: ran.append((args[4], [t.label for t in args[2]])) or real(*args, **kw))
    todo = {k: v for k, v in eval_ids(two).items() if k not in first.evals}
    again = run_point(two, TrialPlan(point, "evaluate", todo), storage, tmp_path / "scratch", lambda e: None)
    assert ran == [(("fewshot",), ["other"]), (("finetune",), ["other"])]
    assert {k: again.evals[k] for k in first.evals} == first.evals
    assert {m.dataset for ev in again.evals.values() for m in ev.measurements} == {"shapes-novel", "other"}


def test_a_stop_asked_during_fine_tuning_stops_it_within_a_few_steps(tmp_path, cache_dir, monkeypatch):
    """The driver's stop (its signal handler writes the stop file) reaches fine-tuning, which keeps no checkpoint:
    it ends within `stop_check_every` steps, the record keeps what finished before it, and the stop names the stage."""
    from pipelines import downstream
    from pipelines.loop import TrainingStopped
    from study.interrupt import STOP

    cfg, point = _fewshot_and_finetune(cache_dir, "evaluate.finetune.steps=400")
    storage, real = Storage(str(tmp_path / "storage")), downstream.run

    def stop_at_fine_tuning(*args, **kw):
        if args[4] == ("finetune",):
            storage.write_bytes(STOP, b"SIGTERM")
        return real(*args, **kw)

    monkeypatch.setattr(downstream, "run", stop_at_fine_tuning)
    with pytest.raises(TrainingStopped) as stopped:
        run_point(cfg, TrialPlan(point, "train", eval_ids(cfg)), storage, tmp_path / "scratch", lambda event: None)
    assert stopped.value.stage == "finetune" and stopped.value.step <= 10, stopped.value
    assert str(stopped.value) == f"stopped at step {stopped.value.step} of finetune"
    from study.trial import load_record

    record = load_record(storage, point.id)
    assert record.pretrain is not None and set(record.evals) == {FEWSHOT}


def test_each_process_has_its_own_scratch_and_a_dead_ones_is_removed(tmp_path, monkeypatch):
    """Two studies on one node can run the same point at once (the same grid with another --out): each trial's
    node-local checkpoints are its process's, never the other's to resume from or delete (the suite's two study
    groups once resumed one smoke trial from the other's step-12 checkpoint, so it trained no step). A killed
    worker's folder goes at the next trial on the node."""
    import socket
    import subprocess
    import sys
    import tempfile

    from study.trial import scratch_dir

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    host = socket.gethostname()
    code = "from study.trial import scratch_dir; d = scratch_dir('p1'); d.mkdir(); print(d)"
    other = Path(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                cwd=ROOT, env={**os.environ, "TMPDIR": str(tmp_path)}).stdout.strip())
    assert other.parent == tmp_path / "vitscale-scratch" and other.exists()  # its process is gone: left behind
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        running = tmp_path / "vitscale-scratch" / f"p1-{host}-pid{sleeper.pid}"
        elsewhere = tmp_path / "vitscale-scratch" / f"p1-{host}x-pid{other.name.rpartition('-pid')[2]}"
        running.mkdir()
        elsewhere.mkdir()  # another node's, on a temp folder the nodes share: its pid means nothing here
        mine = scratch_dir("p1")
        assert mine != other and mine != running and mine.name == f"p1-{host}-pid{os.getpid()}"
        assert not other.exists() and running.exists()  # the dead process's folder removed, a live one's kept
        assert elsewhere.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_trial_on_a_node_that_does_not_see_the_drivers_storage_fails_before_writing(tmp_path, cache_dir):
    """A node that joined after the driver checked the cluster, with its own disk at the storage's path: the lease
    the driver holds is not there (or another's is), so the trial fails in one line (no retry) and writes nothing; on
    the driver's folder it runs."""
    import json

    from study.lease import LEASE
    from study.protocol import Failed, Finished
    from study.trial import _run_guarded

    cfg, point = _fewshot_and_finetune(cache_dir, "evaluate.fewshot.shots=[1]", "evaluate.finetune=null",
                                       "pretrain.steps=2")
    plan = TrialPlan(point, "train", eval_ids(cfg))
    for held in (None, "another driver's"):
        storage = Storage(str(tmp_path / f"node-{held is None}"))
        if held is not None:
            storage.write_bytes(LEASE, json.dumps({"token": held}).encode())
        events = []
        _run_guarded(cfg, plan, storage, tmp_path / "scratch", events.append, lease_token="the driver's")
        assert len(events) == 1 and isinstance(events[0], Failed), events
        assert events[0].reason.startswith("UserError: this node (") and "does not see the study's storage" in (
            events[0].reason)
        assert storage.list_dir("") == ([] if held is None else [LEASE])
    storage.write_bytes(LEASE, json.dumps({"token": "the driver's"}).encode())
    events = []
    _run_guarded(cfg, plan, storage, tmp_path / "scratch", events.append, lease_token="the driver's")
    assert isinstance(events[-1], Finished), events[-1]

"""The study's console (lines, summary, ETA), the progress a trial sends with its events, and what Tune shows."""

import json
import re
import time
from types import SimpleNamespace

import pytest
from ray.tune.logger import JsonLoggerCallback
from ray.tune.progress_reporter import TrialProgressCallback

from pipelines.downstream import Measurement
from study import tune_runner
from study.console import Console, TrialState, duration, eta, finished_numbers, pace, progress_text
from study.protocol import (
    COLUMNS,
    Curve,
    EvalRecord,
    Failed,
    Finished,
    PointFields,
    PointRecord,
    PretrainSummary,
    Progress,
    Stage,
    Started,
    Stopped,
    Tick,
    decode,
    encode,
    progress_of,
)
from study.trial import Reporter


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def _record(model="ViT-B/16", steps=100, pretrain_s=50.0, evals=(("fewshot", 6.0), ("finetune", 4.0))):
    fields = PointFields(model, "ViT", 256, steps * 64, 1e12, 0)
    found = [Measurement("fewshot", "pets", 5, "top1", 41.25, 1.0), Measurement("finetune", "pets", None, "top1", 60.0),
             Measurement("finetune", "pets", None, "macro_f1", 55.0), Measurement("fewshot", "other", 5, "top1", 9.0)]
    summary = PretrainSummary(steps, steps * 64, pretrain_s, 0, val_top1=12.5, images_per_s=830.4)
    return PointRecord("p", fields, summary,
                       {"fewshot": EvalRecord("a", found[:1] + found[3:]), "finetune": EvalRecord("b", found[1:3])},
                       {"data": 1.0, "pretrain": pretrain_s, **dict(evals)})


def test_durations_and_progress_text():
    assert duration(0) == "0:00:00" and duration(59.6) == "0:01:00" and duration(3 * 3600 + 62) == "3:01:02"
    assert progress_text(Progress("pretrain", 40, 120, 412.3, 63.0), 2.71349) == \
        "pretrain: step 40/120 (33%), loss 2.713, 412 images/s, eta 0:01:03"
    assert progress_text(Progress("pretrain", 5, 10), None) == "pretrain: step 5/10 (50%)"


def test_a_finished_line_gives_the_headline_tasks_top1_then_pretraining():
    assert finished_numbers(_record(), "pets") == ("fewshot 5-shot 41.2%, finetune 60.0% (top-1, pets), pretrain val "
                                                   "top-1 12.5%, 830 images/s")


def test_pace_is_per_model_from_finished_trials_and_else_from_running_ones():
    running = TrialState("b", "BiT-M-R50x1", 200, Progress("pretrain", 50, 200, 100.0, 30.0), started=0.0)
    finished = [("ViT-B/16", _record(steps=100, pretrain_s=50.0)), ("ViT-B/16", _record(steps=300, pretrain_s=50))]
    measured = pace(finished, [running])
    assert measured.step_s == {"ViT-B/16": pytest.approx(100 / 400), "BiT-M-R50x1": pytest.approx(30 / 150)}
    assert measured.eval_s == pytest.approx(10.0)  # data loading is not an evaluation
    assert measured.per_step("ViT-L/16") == pytest.approx((0.25 + 0.2) / 2)  # an unmeasured model: the mean
    assert pace([], []).per_step("ViT-B/16") is None


def test_the_eta_spreads_the_work_left_over_the_slots_and_waits_for_the_longest_trial():
    measured = pace([("ViT-B/16", _record(steps=100, pretrain_s=50.0))], [])  # 0.5 s per step, 10 s of evaluations
    pretraining = TrialState("a", "ViT-B/16", 100, Progress("pretrain", 60, 100, 500.0, 20.0), started=0.0)
    evaluating = TrialState("b", "ViT-B/16", 100, Progress("fewshot"), started=0.0, evaluating=96.0)
    pending = TrialState("c", "ViT-B/16", 100)
    done = TrialState("d", "ViT-B/16", 100, done=True)
    # left: a 20 + 10, b 10 - (100 - 96), c 100 * 0.5 + 10; over 2 slots
    assert eta([pretraining, evaluating, pending, done], measured, 100.0, 2) == pytest.approx((30 + 6 + 60) / 2)
    assert eta([pretraining, evaluating], measured, 100.0, 2) == pytest.approx(30)  # the last ones: the longest
    assert eta([pretraining, TrialState("e", "ViT-L/16", 10)], pace([], []), 100.0, 1) is None  # no pace for e yet
    fine_tuning = TrialState("f", "ViT-B/16", 100, Progress("finetune", 10, 400, 90.0, 45.0), started=0.0,
                             evaluating=99.0)  # its sweep's steps say 45 s more: more than the 10 s mean
    assert eta([fine_tuning], measured, 100.0, 1) == pytest.approx(45)
    assert eta([fine_tuning], pace([], []), 100.0, 1) == pytest.approx(45)  # no trial finished yet


def test_the_console_prints_one_line_per_event_and_a_summary(capsys):
    clock = Clock()
    plans = {pid: SimpleNamespace(point=SimpleNamespace(name=f"ViT-B-16_n{n}_s0", model="ViT-B/16", steps=100),
                                  action="train") for pid, n in (("p1", 256), ("p2", 1024))}
    console = Console(plans, "pets", slots=1, clock=clock)
    console.event("p1", Started({"device": "cuda:0", "planned_steps": 100}), Progress())
    console.event("p1", Stage("pretrain", 100), Progress("pretrain", 0, 100))
    clock.now += 10
    console.event("p1", Curve("pretrain", 50, {"loss": 2.5}), Progress("pretrain", 50, 100, 640.0, 10.0))
    console.event("p1", Curve("system/node", 50, {"cpu": 1.0}), Progress("pretrain", 50, 100, 640.0, 10.0))
    clock.now += 5  # within SUMMARY_EVERY_S of the last progress line: not printed
    console.event("p1", Curve("pretrain", 75, {"loss": 2.0}), Progress("pretrain", 75, 100, 640.0, 5.0))
    console.on_step_end(0, [])
    clock.now += 30
    console.on_step_end(0, [])  # the periodic summary: p2 pending, its pace p1's (10 s per 50 steps)
    console.event("p1", Stage("fewshot", task="pets"), Progress("fewshot"))
    console.event("p1", Stage("finetune", task="pets"), Progress("finetune"))
    console.event("p1", Tick(40, 160, {"loss": 1.25, "images_per_s": 320.0}), Progress("finetune", 40, 160, 320.0, 3.0))
    console.event("p1", Tick(80, 160, {"loss": 1.0}), Progress("finetune", 80, 160, 320.0, 2.0))  # within 30 s
    console.event("p1", Finished(_record()), Progress("finetune"))
    console.event("p2", Failed("TrainingDiverged: loss became nan"), Progress())
    console.on_experiment_end([])  # nothing new since the last summary
    lines = [re.sub(r"^\d\d:\d\d:\d\d ", "", line) for line in capsys.readouterr().out.splitlines()]
    assert lines == [
        "ViT-B-16_n256_s0  started: 100 pretraining steps on cuda:0",
        "ViT-B-16_n256_s0  pretrain: started (100 steps)",
        "ViT-B-16_n256_s0  pretrain: step 50/100 (50%), loss 2.5, 640 images/s, eta 0:00:10",
        "study: 0 of 2 done, 1 running, 1 pending, 640 images/s, eta >0:00:25 (0:00:45 elapsed)",
        "ViT-B-16_n256_s0  fewshot on pets: started",
        "ViT-B-16_n256_s0  finetune on pets: started",
        "ViT-B-16_n256_s0  finetune on pets: step 40/160 (25%), loss 1.25, 320 images/s, eta 0:00:03",
        "ViT-B-16_n256_s0  finished in 0:00:45: fewshot 5-shot 41.2%, finetune 60.0% (top-1, pets), pretrain val "
        "top-1 12.5%, 830 images/s",
        "study: 1 of 2 done, 0 running, 1 pending, 0 images/s, eta 0:01:00 (0:00:45 elapsed)",
        "ViT-B-16_n1024_s0  FAILED: TrainingDiverged: loss became nan",
        "study: 2 of 2 done (1 failed), 0 running, 0 pending, 0 images/s, eta 0:00:00 (0:00:45 elapsed)",
    ]


def test_a_trial_sends_its_progress_with_every_event():
    """Tune's table and the console read the stage, step, images/s and the stage's ETA (at its pace since its first
    reported step: the start-up before it made the first ETAs many times too long) from the top-level numbers of each
    result; the event itself decodes back to its type."""
    sent, clock = [], Clock()
    report = Reporter(sent.append, clock)
    report(Stage("pretrain", 100, 20))  # resumed at step 20
    clock.now += 30  # building the model, the loader's start, the first batches
    report(Curve("pretrain", 21, {"loss": 1.1, "images_per_s": 40.0}))  # no pace yet, nor examples: no ETA
    clock.now += 8
    report(Curve("pretrain", 61, {"loss": 1.0, "images_per_s": 320.0}))  # 40 steps in 8 s: 39 left, 7.8 s
    report(Curve("system/node", 61, {"cpu": 3.0}))
    report(Stage("fewshot"))
    report(Stage("finetune", task="pets"))  # its steps are known once its sweep starts: each Tick carries them
    clock.now += 2
    report(Tick(10, 200, {"loss": 0.6, "images_per_s": 100.0, "examples_seen": 320}))  # its window's pace: 61 s
    clock.now += 2
    report(Tick(50, 200, {"loss": 0.5, "images_per_s": 800.0}))
    assert [progress_of(r) for r in sent] == [
        Progress("pretrain", 20, 100), Progress("pretrain", 21, 100, 40.0, None),
        Progress("pretrain", 61, 100, 320.0, 7.8), Progress("pretrain", 61, 100, 320.0, 7.8), Progress("fewshot"),
        Progress("finetune"), Progress("finetune", 10, 200, 100.0, 60.8), Progress("finetune", 50, 200, 800.0, 7.5)]
    assert decode(sent[2]) == Curve("pretrain", 61, {"loss": 1.0, "images_per_s": 320.0})
    assert decode(sent[-1]) == Tick(50, 200, {"loss": 0.5, "images_per_s": 800.0})
    assert progress_of({"training_iteration": 3}) == Progress()  # Tune's own bookkeeping
    newer = {**sent[-1], "study_event": json.dumps({"kind": "Unheard", "payload": {"step": 1}})}
    assert decode(newer) is None  # a kind a newer worker sends: no event, Tune's loop goes on


def test_verbose_keeps_tunes_status_table_with_the_progress_columns_and_the_default_shows_the_console(capsys):
    callback, console = object(), object()
    quiet = tune_runner.output(False, callback, console)
    assert quiet["callbacks"][:2] == [callback, console] and quiet["progress_reporter"] is None
    assert quiet["verbose"] == 0
    verbose = tune_runner.output(True, callback, console)
    assert verbose["callbacks"][0] == callback and verbose["verbose"] == 1
    # Tune's own per-trial log is result.json only (no CSV, no TensorBoard); quiet, its per-trial printer says nothing
    assert [type(c) for c in verbose["callbacks"] if c != callback] == [JsonLoggerCallback]
    assert [type(c) for c in quiet["callbacks"][2:]] == [JsonLoggerCallback, tune_runner.SilentTrialProgress]

    class Trial:  # one that ended without a result (stopped before it started)
        last_result = {}

    TrialProgressCallback().on_trial_complete(0, [], Trial())
    assert "completed. Last result" in capsys.readouterr().out  # what Tune's own printer says, even at verbose 0
    quiet["callbacks"][-1].on_trial_complete(0, [], Trial())
    assert capsys.readouterr().out == ""
    assert list(verbose["progress_reporter"]._metric_columns) == list(COLUMNS)  # stage, step, steps, images/s, eta


def test_finishing_a_point_never_holds_tunes_loop():
    """`on_finished` (figures, stored files) runs beside Tune's loop; `close` waits for it and raises its error."""
    plan = SimpleNamespace(point=SimpleNamespace(id="p1"), evals={"fewshot": "a"})
    done = []

    def slow(point, record, evals, curves):
        time.sleep(1.0)
        done.append(evals)
        raise RuntimeError("drawing failed")

    callback = tune_runner.StudyCallback({"p1": plan}, slow, tracker=None, tags={})
    trial = SimpleNamespace(config={"point": "p1"})
    start = time.perf_counter()
    callback.on_trial_result(0, [], trial, encode(Finished(_record())))
    assert time.perf_counter() - start < 0.2 and callback.records["p1"].point_id == "p"
    with pytest.raises(RuntimeError, match="drawing failed"):
        callback.close()
    assert done == [("fewshot",)]


def test_a_crash_tune_retries_or_gives_up_on_names_the_exception(capsys, tmp_path):
    (tmp_path / "error.txt").write_text("Traceback (most recent call last):\n  ...\nOSError: node lost\n\n")
    point = SimpleNamespace(name="BiT-R14_n256_s0", model="BiT", steps=10)
    plans = {"p1": SimpleNamespace(point=point, action="train")}
    console, trial = Console(plans, "pets", clock=Clock()), SimpleNamespace(config={"point": "p1"})
    console.event("p1", Started({}), Progress())
    trial.error_file = str(tmp_path / "error.txt")
    console.on_trial_recover(0, [], trial)
    assert console.trials["p1"].started is None  # pending until it restarts
    console.on_trial_error(0, [], trial)
    lines = [re.sub(r"^\d\d:\d\d:\d\d ", "", line) for line in capsys.readouterr().out.splitlines()]
    assert lines[1:3] == ["BiT-R14_n256_s0  crashed, retried from its newest checkpoint: OSError: node lost",
                          "BiT-R14_n256_s0  FAILED: OSError: node lost"]


def test_a_trial_stopped_by_the_driver_is_stopped_not_failed_and_one_never_started_stays_pending(capsys):
    clock = Clock()
    plans = {pid: SimpleNamespace(point=SimpleNamespace(name=f"ViT-B-16_n{n}_s0", model="ViT-B/16", steps=100),
                                  action="train") for pid, n in (("p1", 256), ("p2", 1024), ("p3", 4096))}
    console = Console(plans, "pets", slots=1, clock=clock)
    console.event("p1", Started({"device": "cpu"}), Progress())
    console.event("p1", Stopped("stopped by the driver at step 40; a rerun resumes there"), Progress())
    console.event("p2", Failed("TrainingDiverged: loss became nan"), Progress())
    console.on_experiment_end([])
    lines = [re.sub(r"^\d\d:\d\d:\d\d ", "", line) for line in capsys.readouterr().out.splitlines()]
    assert lines[1] == "ViT-B-16_n256_s0  stopped by the driver at step 40; a rerun resumes there"
    assert lines[-1].startswith("study: 1 of 3 done (1 failed, 1 stopped), 0 running, 1 pending")
    assert decode(encode(Stopped("x"))) == Stopped("x")


def test_a_started_line_says_what_the_trial_does_resumed_or_evaluating(capsys):
    """A point planned to train: a retry resumed from a checkpoint says from which step, and one whose pretraining
    had finished before it was cut off says it evaluates (not the plan's "100 pretraining steps")."""
    plans = {f"p{i}": SimpleNamespace(point=SimpleNamespace(name=f"P{i}", model="ViT-B/16", steps=1000),
                                      action="train") for i in range(3)}
    console = Console(plans, "pets", slots=1, clock=Clock())
    console.event("p0", Started({"device": "cpu", "planned_steps": 1000}), Progress())
    console.event("p1", Started({"device": "cpu", "planned_steps": 1000}, {"resumed_from_step": 400}), Progress())
    console.event("p2", Started({"device": "cpu", "world_size": 1}), Progress())
    lines = [re.sub(r"^\d\d:\d\d:\d\d ", "", line) for line in capsys.readouterr().out.splitlines()]
    assert lines == ["P0  started: 1,000 pretraining steps on cpu",
                     "P1  started: pretraining from step 400 of 1,000 on cpu",
                     "P2  started: evaluating stored weights on cpu"]


def test_tunes_slow_operation_warnings_are_left_out_of_the_console_unless_verbose(monkeypatch):
    """Tune warns when its loop takes over 0.5 s for a result ("... may be a performance bottleneck"): nothing a
    study's user can act on (the study's MLflow writes are off that loop), so not printed; `--verbose` keeps it."""
    import logging
    import time

    from ray.tune.utils import util

    from study.tune_runner import quiet_tune

    monkeypatch.setattr(util, "START_OF_TIME", time.time() - 120)  # Tune warns only after its first minute
    logger, seen = logging.getLogger("ray.tune.utils.util"), []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: seen.append(record.getMessage())

    def slow() -> list[str]:
        seen.clear()
        logger.handle(logger.makeRecord(logger.name, logging.WARNING, __file__, 0, "x", (), None))  # one that stays
        with util.warn_if_slow("process_trial_result", threshold=0.001):
            time.sleep(0.01)
        return seen[1:]

    logger.addHandler(handler)
    filters = list(logger.filters)
    try:
        assert any("performance bottleneck" in m for m in slow())  # Tune's, as it is
        quiet_tune(verbose=True)
        assert any("performance bottleneck" in m for m in slow())
        quiet_tune(verbose=False)
        assert slow() == []
        assert seen == ["x"]
    finally:
        logger.removeHandler(handler)
        logger.filters[:] = filters

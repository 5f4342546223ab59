"""The study's console: one line per trial event (started, each stage, progress, finished with its key numbers,
failed with the reason) and a one-line summary every `SUMMARY_EVERY_S` seconds (done, running, pending,
images/s, an ETA), in place of Ray Tune's status table, which `--verbose` keeps instead.

`Console` is a Tune callback, so it runs on Tune's loop: it only keeps a few numbers and prints.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ray.tune import Callback

from study.protocol import (
    Curve,
    Failed,
    Finished,
    PointRecord,
    Progress,
    Stage,
    Started,
    Stopped,
    Tick,
    decode,
    progress_of,
)

SUMMARY_EVERY_S = 30.0  # also the shortest gap between two progress lines of one trial


def duration(seconds: float) -> str:
    """`h:mm:ss`."""
    s = max(0, round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


@dataclass
class TrialState:
    """What the console knows of one trial, from its events."""

    name: str
    model: str
    steps: int  # pretraining steps it will run; 0: it only evaluates stored weights
    progress: Progress = field(default_factory=Progress)
    stage: str = ""  # the running stage as its lines name it: "pretrain", "finetune on pets"
    started: float | None = None  # when it reported `Started`
    evaluating: float | None = None  # when its first evaluation began
    printed: float = -math.inf  # when its last progress line was printed
    done: bool = False  # finished, failed or stopped: nothing left for it in this invocation
    stopped: bool = False  # stopped by the driver (a signal): a rerun resumes it


@dataclass(frozen=True)
class Pace:
    """What the trials measured so far: seconds per pretraining step per model, seconds of evaluation per trial."""

    step_s: dict[str, float]
    eval_s: float | None

    def per_step(self, model: str) -> float | None:
        """The model's own pace, else the mean over the models measured (None: none yet)."""
        if model in self.step_s:
            return self.step_s[model]
        return sum(self.step_s.values()) / len(self.step_s) if self.step_s else None


def pace(finished: list[tuple[str, PointRecord]], running: list[TrialState]) -> Pace:
    """The pace of finished trials (`(model, record)`: their pretraining and evaluation timings); a model none of
    them pretrained takes the pace its running trials show (their ETA over their steps left)."""
    steps: dict[str, list[float]] = {}
    evals = []
    for model, record in finished:
        timings = record.timings
        if record.pretrain and "pretrain" in timings and record.pretrain.steps > record.pretrain.resumed_from_step:
            ran = record.pretrain.steps - record.pretrain.resumed_from_step
            steps.setdefault(model, []).extend((timings["pretrain"], ran))
        evals.append(sum(s for stage, s in timings.items() if stage not in ("pretrain", "data")))
    step_s = {m: sum(v[0::2]) / sum(v[1::2]) for m, v in steps.items()}
    for t in running:
        p = t.progress
        if t.model not in step_s and p.stage == "pretrain" and p.eta_s is not None and p.steps > p.step:
            step_s[t.model] = p.eta_s / (p.steps - p.step)
    return Pace(step_s, sum(evals) / len(evals) if evals else None)


def time_left(t: TrialState, pace: Pace, now: float) -> float | None:
    """Seconds until trial `t` is done (its evaluations counted at the measured mean, 0 before any finished, and
    never less than what the evaluation it runs has left by its own steps); None where no pace is known yet."""
    evals = pace.eval_s or 0.0
    if t.evaluating is not None:
        return max(evals - (now - t.evaluating), t.progress.eta_s or 0.0)
    p, per_step = t.progress, pace.per_step(t.model)
    if p.stage == "pretrain" and p.eta_s is not None:
        return p.eta_s + evals
    if t.steps == 0:
        return evals
    return None if per_step is None else (t.steps - p.step) * per_step + evals


def eta(trials: list[TrialState], pace: Pace, now: float, slots: int) -> float | None:
    """Seconds until the study is done: the work left spread over `slots` trials at a time, and never less than
    the longest running trial has left. None while a trial's pace is unknown."""
    left = [time_left(t, pace, now) for t in trials if not t.done]
    if any(x is None for x in left):
        return None
    running = [x for t, x in zip((t for t in trials if not t.done), left, strict=True) if t.started is not None]
    return max(sum(left) / max(slots, 1), max(running, default=0.0))


def finished_numbers(record: PointRecord, headline_task: str) -> str:
    """A finished point's key numbers: top-1 of each evaluation on the headline task, pretraining accuracy and
    throughput."""
    parts = [f"{m.eval.replace('_', ' ')}{f' {m.shots}-shot' if m.shots is not None else ''} {m.value:.1f}%"
             for m in record.measurements() if m.dataset == headline_task and m.metric == "top1"]
    if parts:
        parts[-1] += f" (top-1, {headline_task})"
    if record.pretrain is not None:
        if record.pretrain.val_top1 is not None:
            parts.append(f"pretrain val top-1 {record.pretrain.val_top1:.1f}%")
        if record.pretrain.images_per_s:
            parts.append(f"{record.pretrain.images_per_s:,.0f} images/s")
    return ", ".join(parts)


def progress_text(p: Progress, loss: float | None, stage: str | None = None) -> str:
    """`pretrain: step 40/120 (33%), loss 2.713, 412 images/s, eta 0:01:03`; `stage` names it where the progress's
    own name does not say enough (`finetune on pets`)."""
    text = f"{stage or p.stage}: step {p.step}/{p.steps} ({p.step / max(p.steps, 1):.0%})"
    if loss is not None:
        text += f", loss {loss:.4g}"
    if p.images_per_s:
        text += f", {p.images_per_s:,.0f} images/s"
    return text + (f", eta {duration(p.eta_s)}" if p.eta_s is not None else "")


class Console(Callback):
    """Prints the study's progress from the trials' events (see the module docstring).

    Args:
        plans: the trials ({point id: `TrialPlan`}).
        headline_task: the downstream task whose top-1 a finished line shows.
        slots: how many trials run at once (for the ETA; the most seen running counts where more).
        clock: monotonic seconds (a test's own clock).
    """

    def __init__(self, plans: dict, headline_task: str, slots: int = 1, clock: Callable[[], float] = time.monotonic):
        self.trials = {pid: TrialState(plan.point.name, plan.point.model,
                                       0 if plan.action == "evaluate" else plan.point.steps)
                       for pid, plan in plans.items()}
        self.headline_task, self.slots, self.clock = headline_task, slots, clock
        self.finished: list[tuple[str, PointRecord]] = []
        self.failed = 0
        self.start = self.last_summary = self.last_event = clock()

    # Tune's hooks.

    def on_trial_result(self, iteration, trials, trial, result, **info):
        event = decode(result)
        if event is not None:
            self.event(trial.config["point"], event, progress_of(result))

    def on_trial_error(self, iteration, trials, trial, **info):
        self.fail(trial.config["point"], error_text(trial))

    def on_trial_recover(self, iteration, trials, trial, **info):
        t = self.trials[trial.config["point"]]
        t.started, t.evaluating, t.progress = None, None, Progress()  # pending again until it restarts
        self._line(t, f"crashed, retried from its newest checkpoint: {error_text(trial)}")

    def on_step_end(self, iteration, trials, **info):
        if self.clock() - self.last_summary >= SUMMARY_EVERY_S:
            self.summary()

    def on_experiment_end(self, trials, **info):
        if self.last_summary < self.last_event:  # what the last summary did not count yet
            self.summary()

    # The lines.

    def event(self, point_id: str, event, progress: Progress) -> None:
        t, now = self.trials[point_id], self.clock()
        self.last_event = now
        match event:
            case Started(params=params, metrics=metrics):
                # Started twice without Tune's retry between (`on_trial_recover` clears it): Ray Train restarted the
                # point's ranks in the same trial, a rank or its node having been lost
                again = " again (a rank was lost; Ray Train restarted the ranks)" if t.started is not None else ""
                t.started = now
                # What the trial does, as it says (a retry of a point whose pretraining had finished evaluates)
                if "planned_steps" not in params:
                    what = "evaluating stored weights"
                elif resumed := metrics.get("resumed_from_step"):
                    what = f"pretraining from step {resumed:,} of {params['planned_steps']:,}"
                else:
                    what = f"{params['planned_steps']:,} pretraining steps"
                self._line(t, f"started{again}: {what} on {params.get('device', '?')}")
            case Stage(name=name, steps=steps, step=step, task=task):
                t.progress, t.printed = progress, -math.inf  # the stage's first step line is printed
                if name != "pretrain" and t.evaluating is None:
                    t.evaluating = now
                at = f" at step {step}" if step else ""
                t.stage = name + (f" on {task}" if task else "")
                self._line(t, f"{t.stage}: started{at}" + (f" ({steps} steps)" if steps else ""))
            case Curve(prefix=prefix, values=values) if prefix == progress.stage:
                self._progress(t, progress, values, now)
            case Tick(values=values):
                self._progress(t, progress, values, now)
            case Curve():
                t.progress = progress
            case Finished(record=record):
                t.done = True
                self.finished.append((t.model, record))
                self._line(t, f"finished in {duration(now - (t.started or now))}: "
                              f"{finished_numbers(record, self.headline_task)}")
                self.summary()
            case Failed(reason=reason):
                self.fail(point_id, reason)
            case Stopped(reason=reason):
                t.done = t.stopped = True
                self._line(t, reason)

    def _progress(self, t: TrialState, progress: Progress, values: dict, now: float) -> None:
        """A step line of the running stage: the first after it starts, then at most one every `SUMMARY_EVERY_S`."""
        t.progress = progress
        if now - t.printed >= SUMMARY_EVERY_S:
            t.printed = now
            self._line(t, progress_text(progress, values.get("loss"), t.stage))

    def fail(self, point_id: str, reason: str) -> None:
        t = self.trials[point_id]
        if not t.done:
            t.done, self.failed = True, self.failed + 1
            self._line(t, f"FAILED: {reason}")
            self.summary()

    def summary(self) -> None:
        now, trials = self.clock(), list(self.trials.values())
        self.last_summary = now
        running = [t for t in trials if t.started is not None and not t.done]
        self.slots = max(self.slots, len(running))
        ended, stopped = sum(t.done for t in trials), sum(t.stopped for t in trials)
        done = ended - stopped
        images = sum(t.progress.images_per_s or 0 for t in running if t.progress.stage == "pretrain")
        measured = pace(self.finished, running)
        left = eta(trials, measured, now, self.slots)
        failed = ", ".join(f"{n} {what}" for n, what in ((self.failed, "failed"), (stopped, "stopped")) if n)
        failed = f" ({failed})" if failed else ""
        if left is None:
            when = "eta unknown until a trial reports its pace"
        else:  # before a trial has finished, its evaluations are not timed: the ETA is a lower bound
            when = f"eta {'' if measured.eval_s is not None else '>'}{duration(left)}"
        print(f"{time.strftime('%H:%M:%S')} study: {done} of {len(trials)} done{failed}, {len(running)} running, "
              f"{len(trials) - ended - len(running)} pending, {images:,.0f} images/s, {when} "
              f"({duration(now - self.start)} elapsed)", flush=True)

    def _line(self, t: TrialState, text: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {t.name}  {text}", flush=True)


def error_text(trial) -> str:
    """The last line of a crashed trial's error file (the exception), or a stand-in where it has none."""
    path = getattr(trial, "error_file", None)
    if path and Path(path).exists():
        lines = [ln for ln in Path(path).read_text().splitlines() if ln.strip()]
        return lines[-1] if lines else "trial raised an error"
    return "trial raised an error"

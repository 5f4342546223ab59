"""What each grid point needs this time, from what MLflow and the study's storage already hold.

- reuse: its child run is complete with the current evaluation protocols; nothing runs.
- log: storage holds its finished record but MLflow does not (a driver killed after the trial, or a tracking
  outage); the record is logged, nothing runs.
- evaluate: its pretrained weights exist (storage, or MLflow from any machine); only the missing or changed
  evaluations run.
- resume: storage holds a checkpoint; pretraining continues from it.
- train: nothing yet.
"""

from __future__ import annotations

from dataclasses import dataclass

from study.config import GridPoint
from study.protocol import PointRecord, Stamps, eval_task, stale
from study.storage import PointFiles, Storage
from study.tracking import ChildRun
from study.trial import load_record

RUNS = ("evaluate", "resume", "train")  # the actions that start a trial


@dataclass(frozen=True)
class Decision:
    """What a point needs, as planned; the driver never changes one (it replaces it: `dataclasses.replace`)."""

    point: GridPoint
    action: str  # reuse | log | evaluate | resume | train
    evals: dict[str, str]  # the evaluations a trial runs {eval_key: protocol id} (empty when nothing runs)
    record: PointRecord | None  # what storage holds for the point
    child: ChildRun | None  # its MLflow child run, if any

    def describe(self) -> str:
        if self.action == "evaluate":
            return f"evaluate ({', '.join(self.evals)})"
        return self.action


def decide(point: GridPoint, evals: dict[str, str], storage: Storage, child: ChildRun | None,
           fresh: bool, stamps: Stamps | None = None) -> Decision:
    """`stamps`: the data as prepared for this invocation; an evaluation on a task whose files changed since the
    record's runs again (`changed_data` says where the pretraining data changed: the driver decides that)."""
    if fresh:
        return Decision(point, "train", dict(evals), None, None)
    record = load_record(storage, point.id)
    moved = record.changed(stamps) if record is not None and stamps is not None else ()
    if child is not None and child.complete and not stale(child.eval_ids, evals) and not moved:
        return Decision(point, "reuse", {}, record, child)
    if record is not None and record.pretrain:
        todo = record.stale(evals, stamps)
        return Decision(point, "evaluate" if todo else "log", {k: evals[k] for k in todo}, record, child)
    if child is not None and child.has_weights:
        todo = stale(child.eval_ids, evals) or tuple(evals)  # an incomplete child re-runs every evaluation
        return Decision(point, "evaluate", {k: evals[k] for k in todo}, None, child)
    if storage.newest_checkpoint(PointFiles(point.id).checkpoints) is not None:
        return Decision(point, "resume", dict(evals), record, child)
    return Decision(point, "train", dict(evals), record, child)


def plan(points: list[GridPoint], evals: dict[str, str], storage: Storage, children: dict[str, ChildRun],
         fresh: bool, stamps: Stamps | None = None) -> list[Decision]:
    return [decide(p, evals, storage, children.get(p.id), fresh, stamps) for p in points]


def changed_data(decisions: list[Decision], stamps: Stamps) -> dict[str, list[Decision]]:
    """The points whose record measured something on files changed since, by what changed: "pretrain" (their
    weights were trained on other data) or a downstream task's name (their evaluations on it run again)."""
    found: dict[str, list[Decision]] = {}
    for d in decisions:
        for key in d.record.changed(stamps) if d.record is not None else ():
            found.setdefault(key if key == "pretrain" else eval_task(key) or key, []).append(d)
    return {key: list({id(d): d for d in ds}.values()) for key, ds in found.items()}

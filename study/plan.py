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

import json
from dataclasses import dataclass

from study.config import GridPoint
from study.protocol import PointRecord, Stamps, changed_since, eval_task, stale
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
    started_on: dict[str, dict] | None = None  # resume: what its pretraining started on (`PointFiles.data_stamp`)
    upstream: bool = False  # evaluate: its upstream top-1 again (the pretraining source's test split changed)

    def describe(self) -> str:
        if self.action == "evaluate":
            return f"evaluate ({', '.join([*(['upstream top-1'] if self.upstream else []), *self.evals])})"
        return self.action


def decide(point: GridPoint, evals: dict[str, str], storage: Storage, child: ChildRun | None,
           fresh: bool, stamps: Stamps | None = None) -> Decision:
    """`stamps`: the data as prepared for this invocation; an evaluation on a task whose files changed since the
    record's runs again (`changed_data` says where the pretraining data changed: the driver decides that)."""
    if fresh:
        return Decision(point, "train", dict(evals), None, None)
    record = load_record(storage, point.id)
    moved = record.changed(stamps, evals) if record is not None and stamps is not None else ()
    if child is not None and child.complete and not stale(child.eval_ids, evals) and not moved:
        return Decision(point, "reuse", {}, record, child)
    if record is not None and record.pretrain:
        todo, upstream = record.stale(evals, stamps), "upstream" in moved
        return Decision(point, "evaluate" if todo or upstream else "log", {k: evals[k] for k in todo}, record, child,
                        upstream=upstream)
    if child is not None and child.has_weights:
        todo = stale(child.eval_ids, evals) or tuple(evals)  # an incomplete child re-runs every evaluation
        return Decision(point, "evaluate", {k: evals[k] for k in todo}, None, child)
    if storage.newest_checkpoint(PointFiles(point.id).checkpoints) is not None:
        started = _started_on(storage, point) if stamps is not None else None
        return Decision(point, "resume", dict(evals), record, child, started)
    return Decision(point, "train", dict(evals), record, child)


def _started_on(storage: Storage, point: GridPoint) -> dict | None:
    """What a point's checkpoints started on (`PointFiles.data_stamp`); None where not written or not readable."""
    raw = storage.read_bytes(PointFiles(point.id).data_stamp)
    try:
        found = json.loads(raw) if raw else None
    except ValueError:
        return None
    return found if isinstance(found, dict) else None


def plan(points: list[GridPoint], evals: dict[str, str], storage: Storage, children: dict[str, ChildRun],
         fresh: bool, stamps: Stamps | None = None) -> list[Decision]:
    return [decide(p, evals, storage, children.get(p.id), fresh, stamps) for p in points]


def changed_data(decisions: list[Decision], evals: dict[str, str], stamps: Stamps
                 ) -> dict[str, list[tuple[Decision, dict]]]:
    """The points that measured something on files changed since, with the stamp they measured on, by what changed:
    "pretrain" or "select/<task>" (their weights came from other data: trained on them, or their kept step chosen
    on them; a resumed run's checkpoints included), "upstream" (their upstream top-1, on the pretraining source's
    test split) or "task/<task>" (their evaluations of `evals` on it)."""
    found: dict[str, dict[str, tuple[Decision, dict]]] = {}
    for d in decisions:
        stamped, record = {}, d.record
        for key in record.changed(stamps, evals) if record is not None else ():
            stamped[key] = record.data[key] if key in record.data else record.evals[key].data
        if d.action == "resume" and d.started_on:
            stamped |= {k: d.started_on[k] for k in changed_since(d.started_on, stamps)}
        for key, stamp in stamped.items():
            source = key if key in ("pretrain", "upstream") or key.startswith("select/") else f"task/{eval_task(key)}"
            found.setdefault(source, {}).setdefault(d.point.id, (d, stamp))
    return {source: list(ds.values()) for source, ds in found.items()}

"""The seam between a trial and the driver, as types.

A trial emits `Started`, `Stage`, `Curve`, `Tick`, `Finished` or `Failed` events; Ray Tune carries each as one JSON
string (its wire format), beside the trial's `Progress` as plain numbers, and the driver decodes it back into the same
type.
What a finished point produced is a `PointRecord`: its pretraining summary and, per evaluation (and downstream task,
for one that runs on each), the identity of the protocol it ran and the typed `Measurement`s. The record is kept in
storage (`points/<id>/record.json`) and in MLflow (`record.json`), and the results table is built from records alone.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field

from pipelines import evaluations
from pipelines.downstream import Measurement


def eval_key(kind: str, task: str | None = None) -> str:
    """The key of an evaluation's identity and record: `kind/task` for one that runs on each downstream task,
    `kind` for one that runs once per point (`pipelines.evaluations`)."""
    return kind if task is None else f"{kind}/{task}"


def eval_kind(key: str) -> str:
    """The evaluation an `eval_key` names (the `eval` column of the results table)."""
    return key.split("/", 1)[0]


def eval_task(key: str) -> str | None:
    """The downstream task an `eval_key` names; None for an evaluation that runs once per point."""
    return key.split("/", 1)[1] if "/" in key else None


def stale(have: dict[str, str], want: dict[str, str]) -> tuple[str, ...]:
    """The evaluations of `want` ({eval_key: protocol id}) missing from `have` or done there with another protocol.
    An identity recorded per evaluation alone (`kind`, as runs logged before per-task identities are tagged) stands
    for each of its tasks: it equals a task's identity exactly when that task was the study's only one then."""
    return tuple(k for k, ident in want.items() if have.get(k, have.get(eval_kind(k))) != ident)


@dataclass
class EvalRecord:
    id: str  # the protocol's identity on its task (study.identity.eval_ids)
    measurements: list[Measurement]
    data: dict | None = None  # its task's splits' stamps when it ran (`Stamps.of`; None: not known, or no task)


Stamp = dict[str, dict | None]  # per split ("train", "test"), `pipelines.data.data_stamp`'s digests (None: unknown)


@dataclass(frozen=True)
class Stamps:
    """What the data were when the driver prepared them (`pipelines.data.data_stamp`, per split): the pretraining
    source's, and each downstream task's by name. A trial records them with what it measures; the plan compares them
    with a point's record (`PointRecord.changed`), so results are never reused on files changed since."""

    pretrain: Stamp | None = None
    tasks: dict[str, Stamp | None] = field(default_factory=dict)

    def of(self, key: str) -> Stamp | None:
        """The splits what `key` names was measured on, as stamped now: "pretrain" (the pretraining source's train
        split: the weights), "upstream" (its test split: the upstream top-1), "select/<task>" (the task's train
        split, whose minival a kept step is chosen on), an `eval_key` (its task, both splits); None where unknown,
        or for an evaluation run once a point."""
        if key in ("pretrain", "upstream"):
            split = "train" if key == "pretrain" else "test"
            found = {split: (self.pretrain or {}).get(split)}
        elif (task := eval_task(key)) is None or self.tasks.get(task) is None:
            return None
        else:
            found = {"train": self.tasks[task].get("train")} if key.startswith("select/") else dict(self.tasks[task])
        return found if any(found.values()) else None

    def now(self, stamped: dict[str, Stamp]) -> dict[str, Stamp]:
        """`stamped` ({key: stamp}) with each stamp as the data are now, where known (`--same-data`)."""
        return {key: self.of(key) or stamp for key, stamp in stamped.items()}

    def weights(self, select_on: str | None, upstream: bool) -> dict[str, Stamp]:
        """What a point's pretraining measured on: its training data, with `upstream` the test split its upstream
        top-1 is measured on, and with `pretrain.select: best` the task its kept step is chosen on (`select_on`)."""
        keys = ["pretrain", *(["upstream"] if upstream else []), *([f"select/{select_on}"] if select_on else [])]
        return {key: stamp for key in keys if (stamp := self.of(key))}


def same_data(recorded: Stamp | None, now: Stamp | None) -> bool:
    """Whether splits stamped `recorded` are those stamped `now`. Unknown counts as the same: a record written before
    stamps were kept, a split that could not be identified, or a plan made without preparing the data (a dry run)."""
    if not recorded or not now:
        return True
    return all(r is None or n is None or r.get("files") == n.get("files")
               for split in recorded.keys() | now.keys() for r, n in [(recorded.get(split), now.get(split))])


def sizes_differ(recorded: Stamp, now: Stamp | None) -> bool:
    """Whether a split's files differ in more than their modification times (added, removed, resized, re-tagged)."""
    return any((r or {}).get("sizes") != ((now or {}).get(split) or {}).get("sizes") for split, r in recorded.items()
               if r is not None and (now or {}).get(split) is not None)


def changed_since(stamped: dict[str, Stamp], stamps: Stamps) -> tuple[str, ...]:
    """The keys of `stamped` ({key: stamp}, `Stamps.of`'s keys) whose data changed since."""
    return tuple(key for key, stamp in stamped.items() if not same_data(stamp, stamps.of(key)))


@dataclass(frozen=True)
class PointFields:
    """The columns every results row of the point carries (`GridPoint.table_fields`)."""

    model: str
    family: str
    subset_size: int
    examples_seen: int
    pretrain_flops: float
    seed: int


@dataclass(frozen=True)
class PretrainSummary:
    """What pretraining a point measured. The throughput fields are those `pipelines.perf.throughput` gives the
    device (a CPU has no device memory, an unknown GPU no MFU); `val_top1` needs a held-out split: the source's test
    split, or the slice carved from it (`data.holdout`), of `val_rows` rows. With
    `pretrain.eval_every`, `selected_step` is the step whose weights the point keeps (and evaluates, and `val_top1`
    measures) and `selected_score` its few-shot headline (`pipelines.selection.headline`)."""

    steps: int
    examples_seen: int
    seconds: float
    resumed_from_step: int
    val_top1: float | None = None
    val_rows: int | None = None
    images_per_s: float | None = None
    step_time_s: float | None = None
    data_wait_fraction: float | None = None
    peak_device_memory_gb: float | None = None
    peak_host_rss_gb: float | None = None
    mfu: float | None = None
    device_peak_tflops: float | None = None
    selected_step: int | None = None
    selected_score: float | None = None

    def to_dict(self) -> dict[str, float]:
        """The fields it has (a field the device did not give is absent, as in the stored JSON)."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, raw: dict) -> PretrainSummary:
        unknown = set(raw) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"pretraining summary: unknown fields {sorted(unknown)}")
        return cls(**raw)


@dataclass
class PointRecord:
    """A point's results so far: filled in by its trial(s) and kept, whole, in storage and MLflow."""

    point_id: str
    fields: PointFields
    pretrain: PretrainSummary | None = None  # None until the point is pretrained
    evals: dict[str, EvalRecord] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage of the trial(s) that made it
    data: dict[str, dict] = field(default_factory=dict)  # what its pretraining measured on (`Stamps.weights`)

    def measurements(self, kinds: dict[str, str] | None = None) -> list[Measurement]:
        """Every measurement, or only those of the evaluations whose identity matches `kinds`."""
        return [m for kind, ev in sorted(self.evals.items())
                if kinds is None or kinds.get(kind) == ev.id for m in ev.measurements]

    def stale(self, kinds: dict[str, str], stamps: Stamps | None = None) -> tuple[str, ...]:
        """The evaluations of `kinds` that this record lacks or ran with another protocol, or (given `stamps`) on
        a task whose files have changed since."""
        old = stale({k: ev.id for k, ev in self.evals.items()}, kinds)
        moved = () if stamps is None else self.changed(stamps, kinds)
        return tuple(k for k in kinds if k in old or k in moved)

    def changed(self, stamps: Stamps, kinds: dict[str, str] | None = None) -> tuple[str, ...]:
        """What this record measured on data whose files have changed since (`same_data`): what its pretraining
        measured on ("pretrain", "upstream", "select/<task>"), then the evaluations (of `kinds`, where given) whose
        task changed."""
        weights = changed_since(self.data, stamps) if self.pretrain else ()
        evals = {k: ev.data for k, ev in self.evals.items() if ev.data and (kinds is None or k in kinds)}
        return weights + changed_since(evals, stamps)

    def restamp(self, stamps: Stamps) -> None:
        """Take `stamps` as the data of what this record holds (`--same-data`: the files changed in name only)."""
        self.data = stamps.now(self.data)
        for key, ev in self.evals.items():
            if ev.data:
                ev.data = stamps.of(key) or ev.data

    def to_json(self) -> str:
        raw = {"point_id": self.point_id, "fields": asdict(self.fields),
               "pretrain": self.pretrain.to_dict() if self.pretrain else {},  # {}: not pretrained yet
               "evals": {k: {f: v for f, v in asdict(ev).items() if f != "data" or v}  # none: as written before
                         for k, ev in self.evals.items()}, "timings": self.timings,
               **({"data": self.data} if self.data else {})}
        return json.dumps(raw, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> PointRecord:
        raw = json.loads(text)
        # A measurement belongs to the evaluation it is recorded under (records written before one spelling per
        # evaluation have "diagnostic" measurements under "diagnostics").
        evals = {}
        for k, v in raw.get("evals", {}).items():
            found = [Measurement(**{**m, "eval": eval_kind(k)}) for m in v["measurements"]]
            evals.update(_per_task(k, v["id"], found, v.get("data")))
        pretrain = raw.get("pretrain") or None
        return cls(raw["point_id"], PointFields(**raw["fields"]),
                   PretrainSummary.from_dict(pretrain) if pretrain else None, evals, raw.get("timings", {}),
                   raw.get("data") or {})


def _per_task(key: str, ident: str, found: list[Measurement], stamp: dict | None = None) -> dict[str, EvalRecord]:
    """A recorded evaluation under per-task keys. A record written before per-task identities holds an evaluation
    that runs on each task under `kind` alone, with one identity for all its tasks; it is split into `kind/task`
    entries that keep that identity (which a task's own matches exactly when it was the study's only task)."""
    if eval_task(key) is not None or not evaluations.per_task(key) or not found:
        return {key: EvalRecord(ident, found, stamp)}  # (no measurements: no task to name, `stale` reads it as each)
    tasks = dict.fromkeys(m.dataset for m in found)
    return {eval_key(key, task): EvalRecord(ident, [m for m in found if m.dataset == task]) for task in tasks}


@dataclass
class Started:
    params: dict  # MLflow params of the child run (manifest hash, device, world size, class balance, ...)
    metrics: dict = field(default_factory=dict)  # e.g. resumed_from_step


@dataclass
class Stage:
    """A stage of the trial starts: "pretrain" or an evaluation (`pipelines.evaluations`)."""

    name: str
    steps: int = 0  # its planned optimizer steps; 0: not counted in steps
    step: int = 0  # where it starts (a resumed pretraining)
    task: str | None = None  # the downstream task an evaluation runs on (None: pretraining, diagnostics)


@dataclass
class Curve:
    prefix: str  # "pretrain", "system/<node>" or "finetune/<task>"
    step: int  # the stage's global optimizer step
    values: dict


@dataclass
class Tick:
    """Progress within the running stage where it logs no curve of its own at these steps (fine-tuning: every
    learning rate's run of its sweep: `step` run of `steps` planned): moves the console's and Tune's progress, and
    reaches no MLflow run (Tune's own `result.json` in storage keeps it, as every event)."""

    step: int
    steps: int
    values: dict  # the last log window's: loss, images_per_s


@dataclass
class Finished:
    record: PointRecord


@dataclass
class Failed:
    reason: str  # one line: a diverged loss or bad data; a deterministic failure Tune must not retry


@dataclass
class Stopped:
    """The driver is stopping the study (a signal): the trial stopped at a step boundary, with its checkpoint where
    it keeps one. Not a failure: a rerun resumes it (`reason` says where)."""

    reason: str


Event = Started | Stage | Curve | Tick | Finished | Failed | Stopped
_KINDS = {cls.__name__: cls for cls in (Started, Stage, Curve, Tick, Finished, Failed, Stopped)}
WIRE_KEY = "study_event"


@dataclass(frozen=True)
class Progress:
    """Where a trial stands: its stage, the stage's step of `steps`, images/s over the last log interval and the
    seconds the stage has left at its pace so far. Sent with every event as top-level numbers, so Tune's own
    status table (`--verbose`) shows them as columns and the study's console reads them."""

    stage: str = ""
    step: int = 0
    steps: int = 0
    images_per_s: float | None = None
    eta_s: float | None = None


COLUMNS = tuple(f.name for f in dataclasses.fields(Progress))


def encode(event: Event, progress: Progress | None = None) -> dict:
    """The dict Ray Tune reports: the progress columns, and one key holding the event as JSON."""
    payload = json.loads(event.record.to_json()) if isinstance(event, Finished) else asdict(event)
    return {**asdict(progress or Progress()), WIRE_KEY: json.dumps({"kind": type(event).__name__, "payload": payload})}


def progress_of(result: dict) -> Progress:
    """The progress a Tune result carries (an empty one for Tune's own bookkeeping results)."""
    return Progress(**{k: result[k] for k in COLUMNS if k in result})


def decode(result: dict) -> Event | None:
    """The event in a Tune result, or None for Tune's own bookkeeping results and for a kind this code does not know
    (a worker's newer checkout: what it adds is progress, never a result)."""
    if WIRE_KEY not in result:
        return None
    raw = json.loads(result[WIRE_KEY])
    if (cls := _KINDS.get(raw["kind"])) is None:
        return None
    if cls is Finished:
        return Finished(PointRecord.from_json(json.dumps(raw["payload"])))
    return cls(**raw["payload"])

"""One grid point: pretrain (or resume, or reuse its stored weights) -> the evaluations of `pipelines.evaluations`.

`run_point` is plain Python (no Ray, no MLflow): it reads and writes the study's `Storage` and emits typed
events. `trainable` is the Ray Tune function trainable around it.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import psutil
import torch
from safetensors.torch import load as load_weights
from safetensors.torch import save as save_weights

from pipelines import data, distributed, downstream, models, pretrain, selection
from pipelines.config import UserError, first_line
from pipelines.loop import EpochRecord, Hooks, TrainingDiverged, TrainingStopped
from pipelines.metrics import evaluate
from pipelines.perf import pick_device
from pipelines.runtime import Runtime
from study.config import GridPoint, StudyConfig
from study.identity import recipe_params
from study.interrupt import (
    STOP,
    await_preempted_checkpoint,
    exit_again_when_swallowed,
    preempted,
    preemption,
    stop_requested,
)
from study.lease import check_shared, not_shared
from study.protocol import (
    Curve,
    EvalRecord,
    Event,
    Failed,
    Finished,
    PointFields,
    PointRecord,
    PretrainSummary,
    Progress,
    Stage,
    Stamps,
    Started,
    Stopped,
    Tick,
    encode,
    eval_kind,
    eval_task,
    same_data,
)
from study.storage import PointFiles, Storage
from study.system_metrics import NodeSampler

Emit = Callable[[Event], None]


@dataclass(frozen=True)
class TrialPlan:
    """What one trial does: pretrain `point` unless its weights are stored, then run the evaluations `evals`
    ({eval_key: protocol id}). `action` says why it runs (train, resume, evaluate) for messages and `--dry-run`."""

    point: GridPoint
    action: str
    evals: dict[str, str]
    stamps: Stamps = Stamps()  # the data as the driver prepared them, recorded with what is measured on them
    upstream: bool = False  # measure the stored weights' upstream top-1 again (its split's files changed)

    @property
    def files(self) -> PointFiles:
        return PointFiles(self.point.id)


def load_record(storage: Storage, point_id: str) -> PointRecord | None:
    """The point's record in storage; None where there is none, or where it cannot be read (cut short or not a
    record: said in one line; the plan then goes by MLflow and the checkpoints, and a trial writes it anew)."""
    rel = PointFiles(point_id).record
    raw = storage.read_bytes(rel)
    if raw is None:
        return None
    try:
        return PointRecord.from_json(raw)
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        print(f"warning: {storage.path(rel)} is not a readable record ({first_line(err)}): ignored; the point is "
              "planned from MLflow and its checkpoints", file=sys.stderr)
        return None


class NotStarted(Exception):
    """The driver was stopping the study when this point's trial began: it ends at once and reports nothing, so the
    point stays as it was (no MLflow run, nothing in storage)."""


class CurveLog:
    """The curves a point's trial emits (`Curve` events: pretraining every `log_every` steps, evaluation during
    training, the fine-tune sweep, system metrics), kept in storage (`PointFiles.curves`) with each checkpoint, after
    pretraining and after each evaluation, by the main rank. The driver logs them to MLflow as they come; a point
    finished while MLflow could not be written (an outage, a killed driver) is logged by a later invocation from
    storage, curves included. A resumed trial starts from the stored file, so its history spans every attempt (a
    step run twice keeps its last values)."""

    def __init__(self, storage: Storage, path: str, main: bool):
        self.storage, self.path, self.main = storage, path, main
        self.curves: dict[str, dict[str, dict]] = (read_curves(storage, path) if main else {})

    def recording(self, emit: Emit) -> Emit:
        def recorded(event) -> None:
            if self.main and isinstance(event, Curve):
                self.curves.setdefault(event.prefix, {})[str(event.step)] = event.values
            emit(event)
        return recorded

    def save(self) -> None:
        if self.main and self.curves:
            self.storage.write_bytes(self.path, json.dumps(self.curves, separators=(",", ":")).encode())


def read_curves(storage: Storage, path: str) -> dict[str, dict[str, dict]]:
    """The stored curves, or none where the file is absent or not what `CurveLog` writes (it is only a copy)."""
    raw = storage.read_bytes(path)
    try:
        curves = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return curves if isinstance(curves, dict) else {}


def run_point(cfg: StudyConfig, plan: TrialPlan, storage: Storage, scratch: Path, emit: Emit,
              progress: bool = False, device: torch.device | None = None) -> PointRecord | None:
    """Run one trial; every file it makes goes to `storage` (`PointFiles`), `scratch` is node-local.

    Called on every rank of a process group, it pretrains and evaluates data-parallel (features extracted in
    parts and gathered, fine-tuning with DDP); rank 0 alone writes to storage, emits events and returns the
    record (the other ranks return None)."""
    point, files = plan.point, plan.files
    if storage.exists(STOP):  # the driver is stopping the study: a point not started yet stays so
        raise NotStarted(point.id)
    device = device or pick_device(cfg.resources.gpus_per_worker)
    where = distributed.ranks()
    curves = CurveLog(storage, files.curves, where.main)
    emit = curves.recording(emit)
    record = load_record(storage, point.id) or PointRecord(point.id, PointFields(**point.table_fields))
    clock = Stopwatch(record.timings)
    src = cfg.data.pretrain
    indexes = index_root(cfg, storage)
    with clock("data"):
        sync_indexes(cfg, storage, src)
        source = data.prepared(src, cfg.cache_dir, indexes)
    stored = bool(record.pretrain)  # pretrained by an earlier trial
    if not stored:
        origin = plan.stamps.weights(cfg.downstream[0].label if cfg.pretrain_for(point.model).selects_best else None,
                                     upstream="test" in source.shards)
        if where.main and storage.newest_checkpoint(files.checkpoints) is None:  # starts from step 0, on these data
            if origin:
                storage.write_bytes(files.data_stamp, json.dumps(origin).encode())
            else:  # not identified this time: an earlier start's stamp would speak for data this run did not see
                storage.delete_file(files.data_stamp)
        with clock("pretrain"):
            state = _pretrain(cfg, point, storage, files, source, scratch, device, emit, progress, curves.save)
        distributed.barrier()  # rank 0 has stored the weights and the summary
        record.pretrain = PretrainSummary(steps=point.steps, examples_seen=point.examples_seen,
                                          **json.loads(storage.read_bytes(files.pretrain_summary)))
        started = storage.read_bytes(files.data_stamp)  # what step 0 saw, if a checkpoint was resumed since
        record.data = json.loads(started) if started else origin
        if where.main:
            storage.write_bytes(files.record, record.to_json().encode())
            storage.delete_dir(files.checkpoints)  # the stored weights and record supersede them
    else:
        emit(Started({**identity_params(cfg, point), "device": str(device), "world_size": where.world_size}))
        state = load_weights(storage.read_bytes(files.kept_weights(cfg.pretrain_for(point.model).selects_best)))
    options = models.ModelOptions.of(cfg.pretrain_for(point.model))
    model = models.build(point.model, src.num_classes, src.image_size, options)
    model.load_state_dict(state)
    model.to(device)
    if plan.upstream and stored and not same_data(record.data.get("upstream"), now := plan.stamps.of("upstream")):
        with clock("upstream"):
            record.pretrain = replace(record.pretrain,
                                      **upstream_top1(cfg, point.model, model, source.subset("test"), device))
        record.data["upstream"] = now
        if where.main:
            storage.write_bytes(files.record, record.to_json().encode())
    pretrained = downstream.Pretrained(point.model, model, state, src.image_size, source, options)
    # A stop (a signal to the driver, a preempted worker) reaches fine-tuning's steps too: it keeps no checkpoint,
    # so a rerun runs that evaluation again, and only that one (the record keeps those finished before it).
    runtime = Runtime(device, point.seed, cfg.cache_dir, indexes, cfg.data.loader, progress,
                      should_stop=stop_requested(storage), precision=cfg.pretrain_for(point.model).precision)

    def curve(prefix: str, step: int, values: dict) -> None:
        emit(Curve(prefix, step, values))

    def tick(step: int, of: int, values: dict) -> None:  # an evaluation's training (fine-tuning's sweep)
        emit(Tick(step, of, values))

    def keep(name: str, contents: bytes) -> None:  # e.g. the ViT's Fig 7 arrays, drawn by the driver
        if where.main:
            storage.write_bytes(files.file(name), contents)

    features: dict = {}  # the frozen model's features, extracted once for every evaluation that needs them
    for key, ident in plan.evals.items():  # {eval_key: id}: per task for an evaluation that runs on each
        if not record.stale({key: ident}, plan.stamps):
            continue  # a retried trial (a preempted worker, a lost node): stored by the attempt before
        kind, task = eval_kind(key), eval_task(key)
        tasks = cfg.downstream if task is None else tuple(t for t in cfg.downstream if t.label == task)
        emit(Stage(kind, task=task))
        try:
            with clock(kind):
                found = downstream.run(cfg.evaluate, pretrained, tasks, runtime, (kind,), curve, keep, features,
                                       tick)
        except TrainingStopped as err:
            raise TrainingStopped(err.step, kind) from None
        record.evals[key] = EvalRecord(ident, found, plan.stamps.of(key))
        curves.save()
        if where.main:
            storage.write_bytes(files.record, record.to_json().encode())
    if not where.main:
        return None
    emit(Finished(record))
    return record


def _pretrain(cfg: StudyConfig, point: GridPoint, storage: Storage, files: PointFiles, source: data.Prepared,
              scratch: Path, device: torch.device, emit: Emit, progress: bool,
              save_curves: Callable[[], None] = lambda: None) -> dict[str, torch.Tensor]:
    """Pretrain from scratch or from the newest checkpoint in storage; store the weights and a summary (and the
    curves, `save_curves`, with each checkpoint and at the end)."""
    src, loader, recipe = cfg.data.pretrain, cfg.data.loader, cfg.pretrain_for(point.model)
    local_ckpts = scratch / "checkpoints"
    shutil.rmtree(local_ckpts, ignore_errors=True)  # storage decides where training resumes, never a node's leftovers
    await_preempted_checkpoint(storage, files.preempted)
    if (name := storage.newest_checkpoint(files.checkpoints)) is not None:
        storage.pull_checkpoint(files.checkpoints, name, local_ckpts)
    resumed = pretrain_step_of(name)
    held = data.held_out(source.index(), cfg.holdout) if cfg.holdout else None
    train = data.nested_subset(source.index(), point.subset_size, point.seed, cfg.data.subset_mode, held)
    val = source.subset("test") if "test" in source.shards else held  # fixed, and never trained on
    where = distributed.ranks()
    if where.main:  # what only rank 0 logs: each costs memory in the subset's size, once per node, not per rank
        balance = data.class_counts(train, src.num_classes)
        storage.write_bytes(files.class_counts, json.dumps(balance).encode())
        emit(Started({**identity_params(cfg, point), "manifest_hash": data.manifest_hash(train),
                      "device": str(device), "planned_steps": point.steps, "loader_workers": loader.workers,
                      "world_size": where.world_size, "class_count_min": balance["min"],
                      "class_count_max": balance["max"], "empty_classes": balance["empty_classes"]},
                     {"resumed_from_step": resumed} if resumed else {}))
    emit(Stage("pretrain", point.steps, resumed))

    def push(path: Path) -> None:  # rank 0's checkpoints reach storage, where a retry on any node finds them
        storage.push_checkpoint(path, files.checkpoints, recipe.keep_checkpoints)
        save_curves()

    def logged(record: EpochRecord) -> None:  # every pretrain.log_every steps and at epoch ends
        emit(Curve("pretrain", record.step, record.metrics()))
        if system := sampler.read():
            emit(Curve(f"system/{sampler.node}", record.step, system))

    def measured(prefix: str, step: int, values: dict) -> None:  # evaluation during training (eval_every)
        emit(Curve(prefix, step, values))

    rt = Runtime(device, point.seed, loader=loader, progress=progress, should_stop=stop_requested(storage))
    probe = selection.Probe(cfg.evaluate.fewshot, cfg.downstream, val, point.model, src.image_size,
                            Runtime(device, point.seed, cfg.cache_dir, index_root(cfg, storage), loader, False,
                                    precision=recipe.precision),
                            measured) if recipe.eval_steps else None
    with NodeSampler() as sampler:
        result = pretrain.run(recipe, point.model, train, src.num_classes, src.image_size, rt,
                              Hooks(on_log=logged, checkpoint_dir=local_ckpts, on_checkpoint=push), probe=probe)
    del train
    summary = {"seconds": result.seconds, "resumed_from_step": resumed,
               **result.throughput}  # images_per_s, step_time_s, data_wait_fraction, peak memory, mfu
    if result.chosen is not None:
        summary |= {"selected_step": result.chosen.step, "selected_score": result.chosen.score}
    state = result.selected_state
    if val is not None:  # held-out upstream accuracy: is the model data- or optimisation-limited?
        model = models.build(point.model, src.num_classes, src.image_size, models.ModelOptions.of(recipe))
        model.load_state_dict(state)
        summary |= upstream_top1(cfg, point.model, model.to(device), val, device)
    if not where.main:
        return state
    storage.write_bytes(files.weights,
                        save_weights(result.state_dict, metadata={"model": point.model, "steps": str(point.steps)}))
    if recipe.selects_best:
        storage.write_bytes(files.best_weights, save_weights(state, metadata={
            "model": point.model, "step": str(result.chosen.step if result.chosen else point.steps)}))
    storage.write_bytes(files.model_spec, json.dumps(
        {"model": point.model, "num_classes": src.num_classes, "image_size": src.image_size,
         "options": models.ModelOptions.of(recipe).changed()}).encode())
    storage.write_bytes(files.pretrain_summary, json.dumps(summary).encode())
    save_curves()
    return state


def upstream_top1(cfg: StudyConfig, model_name: str, model: torch.nn.Module, val: data.ShardSubset,
                  device: torch.device) -> dict[str, float]:
    """`val_top1` and `val_rows` of a pretraining summary: `model`'s top-1 on `val`, the pretraining source's test
    split or the slice held out of it (on every rank of a process group)."""
    top1 = evaluate(model, val, cfg.data.pretrain.image_size, device, max_bad_fraction=cfg.data.loader.max_bad_fraction,
                    precision=cfg.pretrain_for(model_name).precision)["top1"]
    return {"val_top1": top1, "val_rows": len(val)}


class Stopwatch:
    """Seconds per stage, added into `into` (a record's timings: a resumed or re-evaluated point adds up)."""

    def __init__(self, into: dict[str, float]):
        self.into = into

    @contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.into[stage] = self.into.get(stage, 0.0) + time.perf_counter() - start


def identity_params(cfg: StudyConfig, point: GridPoint) -> dict:
    """The child run's params: the point and everything its identity hashes (the same for every invocation)."""
    return {"point_id": point.id, **point.table_fields, "steps": point.steps, **recipe_params(cfg, point.model)}


def pretrain_step_of(checkpoint_name: str | None) -> int:
    return int(checkpoint_name.rsplit("-", 1)[1]) if checkpoint_name else 0


def index_root(cfg: StudyConfig, storage: Storage) -> Path:
    """Where the study's source indexes live: under a local (or NFS) storage root, which every node sees, so the
    driver builds each once and no node rebuilds it; with object storage, in each node's cache (`cfg.cache_dir`),
    filled from storage (`sync_indexes`)."""
    local = storage.local_path("index")
    return local if local is not None else cfg.cache_dir / "index"


def sync_indexes(cfg: StudyConfig, storage: Storage, src, found: data.Prepared | None = None,
                 upload: bool = False) -> None:
    """With object storage: the driver uploads what it prepared (`upload`, `found`); a node brings its copy up to
    what storage holds before each trial: the index folders the stored record names that it lacks (each moved into
    place whole), the files a folder it has lacks (orders of seeds added later), and then the record itself, last,
    so a trial that finds the record finds its folders, and a node that prepared the source from other shards
    (rewritten since) takes the new record rather than keeping its own. Nothing to do on a local root."""
    from pipelines import atomic

    if storage.local_path("index") is not None:
        return
    root = index_root(cfg, storage)
    record = data.record_path(src, root)
    rel = f"index/{record.parent.name}/{record.name}"
    if upload:
        for folder in map(Path, found.indexes.values()):  # what storage lacks (new seeds' orders too), meta.json last
            stored = storage.sizes(f"index/{folder.name}")
            for f in sorted(_finished(folder.iterdir()), key=lambda p: p.name == "meta.json"):
                if stored.get(f.name) != f.stat().st_size:
                    storage.upload_file(f, f"index/{folder.name}/{f.name}")
        storage.upload_file(record, rel)
        return
    stored = storage.read_bytes(rel)
    if stored is None:
        return  # nothing uploaded: `data.prepared` prepares the source here
    for folder in (root / Path(f).name for f in json.loads(stored)["indexes"].values()):
        sizes = storage.sizes(f"index/{folder.name}")
        if not (folder / "meta.json").exists():
            with atomic.folder(folder) as tmp:
                for name in sizes:
                    storage.download_file(f"index/{folder.name}/{name}", tmp / name)
            continue
        have = {p.name: p.stat().st_size for p in _finished(folder.iterdir())}
        for name, n in sizes.items():
            if have.get(name) != n:  # absent here, or not what storage holds now
                storage.download_file(f"index/{folder.name}/{name}", folder / name)
    if not record.exists() or record.read_bytes() != stored:
        atomic.write_bytes(record, stored)


def _finished(files) -> list[Path]:
    """Files, less the temporary ones a writer is filling (`atomic.temp_name`'s hidden names)."""
    return [f for f in files if not f.name.startswith(".")]


def trainable(config: dict, plans: dict[str, TrialPlan], cfg: StudyConfig, storage_root: str,
              lease_token: str | None = None) -> None:
    """Ray Tune function trainable for the point `config["point"]`: the point itself (one worker), or the driver of
    its Ray Train run (`resources.workers_per_trial` > 1). Failures known to be deterministic (divergence, bad
    data) are reported as `Failed` and end the trial without a retry; anything else raises, so Tune's (or
    Train's) FailureConfig restarts it, and it resumes from the newest checkpoint in storage."""
    from ray import tune

    plan = plans[config["point"]]
    exit_again_when_swallowed()
    if cfg.resources.workers_per_trial > 1:
        return _drive_train_run(plan, cfg, storage_root, lease_token)
    torch.set_num_threads(max(1, int(cfg.resources.cpus_per_worker)))
    _run_guarded(cfg, plan, Storage(storage_root), scratch_dir(plan.point.id), Reporter(tune.report),
                 lease_token=lease_token)
    return None


def scratch_dir(point_id: str) -> Path:
    """This process's node-local folder for a trial of `point_id` (its checkpoints before they reach storage),
    removed when the trial ends. Its own, not the point's: another study on this node can run the same point at the
    same time (the same grid with another --out), and would resume from this one's checkpoints, or delete them
    under it. A trial that raises for a retry (a preempted worker, a transient error) leaves its folder; this
    host's folders whose process is gone are removed here. The host is in the name, as a temp folder may be shared
    by nodes whose process ids mean nothing here."""
    base = Path(tempfile.gettempdir()) / "vitscale-scratch"
    base.mkdir(parents=True, exist_ok=True)
    mark = f"-{socket.gethostname()}-pid"
    for old in base.iterdir():
        _, here, pid = old.name.rpartition(mark)
        if here and pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    return base / f"{point_id}{mark}{os.getpid()}"


class Reporter:
    """The trial's side of the wire: each event goes to `send` (Tune's report) with the trial's `Progress`, kept
    here from the events themselves: a `Stage` starts it, the stage's own curve or a `Tick` moves it (step,
    images/s, and the seconds left at the stage's pace since its first step was reported). The pace is measured
    from that first report, not from the stage's start: building the model, starting the loader and the first
    batches (a resumed run's too) made the first ETAs many times the real one (0:23:32 for a 1.6-minute point).
    The first report's ETA is its own log window's images/s over the examples left (`examples_seen` / step a
    step), where it says them; else none."""

    def __init__(self, send: Callable[[dict], None], clock: Callable[[], float] = time.monotonic):
        self.send, self.clock = send, clock
        self.progress, self.since, self.first = Progress(), clock(), None

    def __call__(self, event: Event) -> None:
        if isinstance(event, Stage):
            self.progress = Progress(event.name, event.step, event.steps)
            self.first = None
        elif isinstance(event, Curve) and event.prefix == self.progress.stage or isinstance(event, Tick):
            steps = event.steps if isinstance(event, Tick) else self.progress.steps
            rate, seen = event.values.get("images_per_s"), event.values.get("examples_seen")
            if self.first is None:
                self.since, self.first = self.clock(), event.step
            done = event.step - self.first
            if done > 0 and steps:
                eta = (steps - event.step) * (self.clock() - self.since) / done
            elif steps and rate and seen and event.step > 0:
                eta = (steps - event.step) * seen / event.step / rate
            else:
                eta = None
            self.progress = replace(self.progress, step=event.step, steps=steps,
                                    images_per_s=event.values.get("images_per_s"), eta_s=eta)
        self.send(encode(event, self.progress))


def _run_guarded(cfg: StudyConfig, plan: TrialPlan, storage: Storage, scratch: Path, emit: Emit,
                 device: torch.device | None = None, lease_token: str | None = None) -> None:
    """`run_point`, its failures as events (where a retry cannot mend them) or raised for Tune's retry; first, where
    the driver gave its lease's token, a check that this node sees the driver's storage."""
    start = time.time()
    with preemption(storage, plan.files.preempted) as saved:
        try:
            check_shared(storage, lease_token)
            run_point(cfg, plan, storage, scratch, emit, device=device)
        except TrainingStopped as err:
            if preempted():  # this worker got SIGTERM: checkpointed; it exits, and Tune retries the trial from there
                saved()
                raise RuntimeError(f"worker preempted (SIGTERM) {err.where}: " + (
                    "checkpointed, retried from there" if err.stage == "pretrain" else
                    f"retried, {err.stage} from its start")) from None
            emit(Stopped(f"stopped by the driver {err.where}; a rerun " + (  # not retried
                "resumes there" if err.stage == "pretrain" else f"runs {err.stage} again")))
        except NotStarted:
            pass  # no event: no MLflow run, and the console counts it as not started
        except (TrainingDiverged, UserError) as err:
            emit(Failed(f"{type(err).__name__}: {err} (after {time.time() - start:.0f} s)"))
        except OSError as err:
            if (why := unfixable_by_retry(err, storage.root)) is None:
                raise  # a transient error (a network blip, a lost node): Tune's FailureConfig retries the trial
            emit(Failed(why))
    shutil.rmtree(scratch, ignore_errors=True)  # a crash keeps it for nobody: a retry starts from storage


# OS errors that a retry of the trial cannot fix: what to do about each.
UNFIXABLE = {errno.ENOSPC: "free space there", errno.EDQUOT: "raise the quota or free space there",
             errno.EACCES: "fix the permissions", errno.EPERM: "fix the permissions",
             errno.EROFS: "give a writable --storage"}


def unfixable_by_retry(err: OSError, root: str | None = None) -> str | None:
    """One line naming the path and what to do, for an OS error that retrying cannot fix (no space, no permission,
    a read-only file system); None for others. pyarrow's file systems raise OSErrors without `errno` set, with
    the C error in the message (and no file name: then `root`, the storage it was writing to, is named)."""
    code = err.errno
    if code is None:
        code = next((c for c in UNFIXABLE if os.strerror(c).lower() in str(err).lower()), None)
    if code not in UNFIXABLE:
        return None
    where = f" ({err.filename})" if err.filename else f" (under {root})" if root else ""
    return (f"{os.strerror(code)}{where}: {UNFIXABLE[code]}, then rerun the same command (not retried: a retry "
            f"cannot fix it; finished points and checkpoints are kept). {str(err).splitlines()[0][:300]}")


def _drive_train_run(plan: TrialPlan, cfg: StudyConfig, storage_root: str, lease_token: str | None = None) -> None:
    """Start the point's Ray Train run (N DDP ranks that Ray places, across nodes when needed) and pass rank 0's
    events on to Tune as they come. The Train run's state lives in storage under `train/`; its restarts (a rank
    or node lost) resume from the point's newest checkpoint in storage."""
    import threading

    from ray import train, tune
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Empty, Queue

    r = cfg.resources
    events = Queue(actor_options={"num_cpus": 0})  # lives in the trial's (CPU-less) placement group
    trainer = TorchTrainer(
        _rank_main, train_loop_config={"plan": plan, "cfg": cfg, "storage_root": storage_root, "events": events,
                                       "lease_token": lease_token},
        scaling_config=train.ScalingConfig(num_workers=r.workers_per_trial, use_gpu=r.gpus_per_worker > 0,
                                           resources_per_worker={"CPU": r.cpus_per_worker, "GPU": r.gpus_per_worker}),
        run_config=train.RunConfig(name=f"{plan.point.id}-{time.strftime('%Y%m%d-%H%M%S')}",
                                   **Storage(storage_root).for_ray("train"),
                                   failure_config=train.FailureConfig(max_failures=r.max_failures)))
    outcome: dict = {}

    def fit() -> None:
        try:
            trainer.fit()
        except Exception as err:  # noqa: BLE001  (re-raised in the trial below, so Tune sees it)
            outcome["error"] = err

    runner = threading.Thread(target=fit, name=f"train-{plan.point.id}", daemon=True)
    runner.start()
    while True:
        try:
            tune.report(events.get(timeout=1.0))
        except Empty:
            if not runner.is_alive():
                break
    while not events.empty():
        tune.report(events.get())
    if "error" in outcome:
        raise outcome["error"]


def _rank_main(config: dict) -> None:
    """One DDP rank of a point's Ray Train run: node-local caches built by the node's first rank, then the point
    (rank 0 sends its events to the trial through the queue)."""
    from ray import train
    from ray.train.torch import get_device

    plan, cfg, events = config["plan"], config["cfg"], config["events"]
    context = train.get_context()
    torch.set_num_threads(max(1, int(cfg.resources.cpus_per_worker)))
    main = context.get_world_rank() == 0

    def send(result: dict) -> None:
        if main:
            events.put(result)

    storage = Storage(config["storage_root"])
    try:  # each rank's node sees the driver's storage, before any read: else the point fails, not retried
        check_shared(storage, config.get("lease_token"))
        blind = None
    except UserError as err:
        blind = str(err)
    if distributed.any_rank(blind is not None):  # every rank returns; rank 0 says why
        Reporter(send)(Failed(f"UserError: {blind or not_shared(storage, 'the node of another rank of this point')}"))
        return
    if context.get_local_rank() == 0:  # one process per node writes the shared cache, the others read it
        for src in (cfg.data.pretrain, *cfg.downstream):  # shards generated in this node's cache, if it lacks them
            data.prepared(src, cfg.cache_dir, index_root(cfg, storage))
    distributed.barrier()

    _run_guarded(cfg, plan, storage, scratch_dir(plan.point.id), Reporter(send), device=get_device())

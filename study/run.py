"""Run a scaling study: expand the grid, find what is already done, run the rest with Ray Tune, log to MLflow,
write the results and the report. Running the same command again resumes, extends and re-evaluates.

    python -m study.run --grid configs/scaling.yaml [key.path=value ...] [--dry-run [--json]] [--fresh]
                        [--suggest [--budget GPU_HOURS] [--apply FILE]] [--mfu X]
                        [--address host:port] [--out runs] [--storage PATH_OR_URI] [--tracking-uri URI] [--verbose]
"""

from __future__ import annotations

import _thread
import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from pipelines import atomic
from pipelines.config import UserError, count, flatten, to_dict
from pipelines.models import ModelOptions
from study.config import (
    GridPoint,
    StudyConfig,
    check_data,
    expand,
    load_study,
    pipe_commands,
    pipe_specs,
    relative_paths,
)
from study.cost import ASSUMED_MFU, describe, print_grid
from study.lease import LeaseLost, heartbeat_seconds


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m study.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", required=True, help="study YAML, e.g. configs/scaling.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. pretrain.epochs=3")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the expanded grid, its cost and what each point will do, check every local data "
                             "path and count, list what it could not check, then exit (2 if a check failed)")
    parser.add_argument("--json", action="store_true", help="with --dry-run: print the grid as JSON")
    parser.add_argument("--suggest", action="store_true", help="rank the grid points that would most narrow the "
                        "ViT-vs-BiT crossover interval per GPU-hour, from the points already finished, then exit")
    parser.add_argument("--budget", type=float, default=None,
                        help="with --suggest: GPU-hours to spend (chosen greedily); default: the best point only")
    parser.add_argument("--apply", metavar="FILE", help="with --suggest: write the grid with the chosen points added")
    parser.add_argument("--mfu", type=float, default=None,
                        help="with --dry-run or --suggest: price the grid at this model FLOPs utilisation per "
                             "device, a fraction of one GPU's peak (a trial's pretrain/mfu as logged in MLflow, "
                             "which is per device, from a run on the same GPU); default: 0.4, assumed")
    parser.add_argument("--fresh", action="store_true",
                        help="ignore earlier results: a new MLflow parent run, every point trained anew")
    parser.add_argument("--replace", action="store_true",
                        help="let this grid be the study even though it leaves out finished points of its last run "
                             "(a changed recipe or source, a model or seed taken out); they stay in storage and "
                             "MLflow, and the earlier grid reuses them")
    parser.add_argument("--same-data", action="store_true",
                        help="keep the results of points whose data files changed since they were measured, where "
                             "the content is the same (files copied or touched); without it such points are refused "
                             "(the data their weights came from) or measured again (a test split, a downstream task)")
    parser.add_argument("--address", default=None, help="join an existing Ray cluster instead of starting one")
    parser.add_argument("--out", default="runs", help="output root (results, figures, the MLflow store)")
    parser.add_argument("--storage", default=None,
                        help="where checkpoints, weights and trial files live (default: OUT/STUDY/storage; "
                             "on a cluster a shared folder or s3://, gs://)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite in --out)")
    parser.add_argument("--verbose", action="store_true",
                        help="show Ray Tune's own status table (with each trial's stage, step, images/s and ETA) "
                             "instead of the study's one line per trial event")
    parser.add_argument("--force-unlock", action="store_true",
                        help="take the study's lease even if another driver seems to hold it (when that driver is "
                             "known to be gone)")
    return parser.parse_intermixed_args(argv)  # overrides may come before or after the options


def check_flags(args: argparse.Namespace) -> None:
    """Flags that only mean something with --dry-run or --suggest, given without it: a study must not start (and
    spend GPU-hours) because `--dry-run` was forgotten.

    Raises:
        UserError: one line naming the flag and what it needs.
    """
    needs = {"--json": ("--dry-run", args.json and not args.dry_run),
             "--budget": ("--suggest", args.budget is not None and not args.suggest),
             "--apply": ("--suggest", args.apply is not None and not args.suggest),
             "--mfu": ("--dry-run or --suggest", args.mfu is not None and not (args.dry_run or args.suggest))}
    for flag, (with_, given_alone) in needs.items():
        if given_alone:
            raise UserError(f"{flag} works only with {with_}; add it (nothing was run)")
    if args.same_data and args.fresh:
        raise UserError("--same-data keeps earlier results and --fresh ignores them: give one of them")
    if args.dry_run and args.suggest:
        raise UserError("--dry-run and --suggest (`vit-scaling suggest`) are two different reports: give one of them")
    if args.apply is not None:
        from study.suggest import check_apply

        check_apply(args.apply, args.grid)


def print_recipes(cfg: StudyConfig, as_json: bool) -> None:
    """Each model's pretraining recipe, `recipes:` merged over `pretrain:` (text only: --json prints the points)."""
    if as_json:
        return
    print("\nPretraining recipe per model (pretrain: with recipes: merged over it):")
    for model in cfg.models:
        p = cfg.pretrain_for(model)
        duration = next(f"{k} {getattr(p, k):g}" for k in ("epochs", "steps", "examples") if getattr(p, k) is not None)
        knobs = ModelOptions.of(p).changed() | ({"label_smoothing": p.label_smoothing} if p.label_smoothing else {})
        print(f"  {model:<16} {duration}, batch {p.batch_size}, {p.optimizer} lr {p.lr:g}, wd {p.weight_decay:g}, "
              f"warm-up {p.warmup_steps}, {p.decay} decay, {p.loss}"
              + "".join(f", {k} {v}" for k, v in knobs.items()) + (cfg.recipes.where(model) or " (pretrain: only)"))
        steps, size = min((p.total_steps(size), size) for size in cfg.data.subsets)
        if p.warmup_steps >= steps:  # allowed (a quick check runs a few steps), but never what a study wants
            print(f"    note: the warm-up ({p.warmup_steps} steps) is not shorter than the run ({steps} steps at "
                  f"{size:,} images): the learning rate never reaches {p.lr:g}")
        if p.selects_best and (queries := minival_size(cfg.downstream[0])) < MINIVAL_WARN:
            print(f"    note: its kept step is chosen on a minival of ~{queries:,} images of downstream[0] "
                  f"({cfg.downstream[0].label}): one image is {100 / queries:.2g} points of few-shot top-1, so steps "
                  "closer than a few of those are picked by chance (a larger task, or pretrain.select: final)")


MINIVAL_WARN = 200  # a minival smaller than this (each image > 0.5 points) is noted in the dry run's recipes


def minival_size(task) -> int:
    """About how many of `task`'s train images a kept step is chosen on (`pipelines.selection.minival`)."""
    from pipelines.selection import MINIVAL_FRACTION, MINIVAL_MAX

    return max(1, round(min(MINIVAL_FRACTION, MINIVAL_MAX / max(task.size, 1)) * task.size))


LIST_COMMANDS = 20  # up to this many, the pipe: commands are listed one by one; more, as the grid's specs


def print_commands(commands: list[str], as_json: bool, specs: dict[str, int] | None = None) -> None:
    """A grid file is code: show every shell command its `pipe:` URLs would run: each, up to `LIST_COMMANDS`, else
    each of the grid's `specs` with its brace ranges and how many commands it expands to (a line per shard of a
    30,000-shard source would bury the one that matters)."""
    if not commands:
        return
    if as_json:  # stdout stays one JSON document
        print(f"{len(commands)} shell commands from pipe: URLs; --dry-run without --json lists them", file=sys.stderr)
        return
    if len(commands) <= LIST_COMMANDS or not specs:
        print(f"\nThe grid's pipe: URLs run these {len(commands)} shell commands (review them as you would a script):")
        for command in commands:
            print(f"  {command}")
        return
    print(f"\nThe grid's pipe: URLs run {len(commands):,} shell commands, from these {len(specs)} specs, each with its "
          "brace ranges (review them as you would a script):")
    width = max(len(spec) for spec in specs)
    for spec, n in specs.items():
        print(f"  {spec:<{width}}  ({n:,} command{'s' * (n != 1)})")


def print_unchecked(found, as_json: bool) -> None:
    """What the dry run could not check without reading the data (remote shards, shards without `_info.json`), and
    what it saw but cannot price (cut tars: how many samples they lost)."""
    out = sys.stderr if as_json else sys.stdout  # stdout stays one JSON document
    for lines, header in ((found.unchecked, "not checked"), (found.noted, "noted")):
        if lines:
            print(f"\n{header} (the real run checks these when it indexes the data, before any trial starts):",
                  file=out)
            for line in lines:
                print(f"  {line}", file=out)


def git_commit() -> str:
    """The checkout's commit; where there is no .git (a Ray job's uploaded copy of the working dir), the one the
    submitter passed as VIT_SCALING_GIT_COMMIT; else `unknown`."""
    given = os.environ.get("VIT_SCALING_GIT_COMMIT", "").strip() or "unknown"
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or given
    except (OSError, subprocess.SubprocessError):
        return given


def prepare_data(cfg: StudyConfig, storage, mapper=None):
    """Generate or check every data source and index it once into storage, before any trial starts (missing paths,
    corrupt shards and repeated keys fail here), with the held-out slice and each seed's subset order, so trials only
    map files. Returns what the files are (`Stamps`), for the plan to compare with what finished points saw."""
    from pipelines import data, downstream, pretrain
    from study.protocol import Stamps
    from study.trial import index_root, sync_indexes

    limit, root = cfg.data.loader.max_bad_fraction, index_root(cfg, storage)
    pretrained_on, tasks = None, {}
    keys = ["data.pretrain", *(f"downstream[{i}]" for i in range(len(cfg.downstream)))]
    for key, src in zip(keys, (cfg.data.pretrain, *cfg.downstream), strict=True):
        try:
            found = data.prepare(src, cfg.cache_dir, root, progress=True, max_bad_fraction=limit, mapper=mapper)
        except data.DataError as err:  # which source of the grid: two may read the same kind of data
            raise data.DataError(f"{key}: {err}") from None
        if src is cfg.data.pretrain:  # a multi-label source with a softmax loss
            pretrained_on = found.stamp
            index = found.index()
            for loss in dict.fromkeys(cfg.pretrain_for(model).loss for model in cfg.models):  # recipes may differ
                pretrain.check_labels(loss, index)
            held = data.held_out(index, cfg.holdout) if cfg.holdout else None  # stored once, where read by offset
            if cfg.data.subset_mode == "samples":  # each seed's order, each point's rows: trials map them
                for seed in cfg.seeds:
                    for n in cfg.data.subsets:
                        data.nested_subset(index, n, seed, "samples", held)
        else:  # what the evaluations cannot measure on this task, refused before any trial starts
            tasks[src.label] = found.stamp
            downstream.check_task(cfg.evaluate, src, found.index())
            if (ft := cfg.evaluate.finetune) is not None and ft.val_fraction:  # the minival's order: stored once
                found.index().order(ft.minival_seed)
        sync_indexes(cfg, storage, src, found, upload=True)
    return Stamps(pretrained_on, tasks)


class Locations:
    """Where an invocation reads and writes: the output folder, the storage and the tracking store."""

    def __init__(self, cfg: StudyConfig, args: argparse.Namespace):
        from study.storage import Storage
        from study.tracking import default_tracking_uri

        self.root = Path(args.out).resolve()
        self.out = self.root / cfg.study
        self.storage = Storage(args.storage or str(self.out / "storage"))
        self.storage_root = self.storage.root  # a local one absolute, as the trials receive it
        self.tracking_uri = args.tracking_uri or default_tracking_uri(self.root)


def check_folders(cfg: StudyConfig, args: argparse.Namespace, create: bool) -> None:
    """The local folders this invocation writes (--out, a local --storage, data.cache_dir) can be folders: none is
    a file or below one, and --out and --storage can be written (the cache may be a filled, read-only one). With
    `create` (a real run, once the other checks passed) each is made here, so that one that cannot be (a read-only or
    pseudo file system) is one line before any work, not a traceback from deep in a stage. Paths as the run reads
    them (`Locations`: no `~` expanded).

    Raises:
        UserError: naming the option or key, the path and why.
    """
    folders = [("--storage", Path(args.storage), True)] if args.storage and "://" not in args.storage else []
    folders += [("data.cache_dir", cfg.cache_dir, False), ("--out", Path(args.out) / cfg.study, True)]
    for what, path, write in folders:
        if (problem := atomic.folder_problem(path, write)) is not None:
            raise UserError(f"{what}: {path} {problem}; give a folder this user can write")
    for what, path, _ in folders if create else ():  # (--out last: a refusal leaves no study folder behind)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"{what}: cannot make the folder {path} ({err.strerror or err}); give a folder this "
                            "user can write") from None


def read_plan(cfg: StudyConfig, points: list[GridPoint], args: argparse.Namespace, where: Locations | None = None):
    """The plan from what storage and MLflow hold (at `where`, made from `args` if not given), read without writing
    to either, and the read-only tracker it came from (None without a tracking store)."""
    from study.identity import eval_ids
    from study.plan import plan
    from study.tracking import Tracker

    where, tracker = where or Locations(cfg, args), None
    sqlite = where.tracking_uri.startswith("sqlite:///")  # a local store that is not there has nothing to read,
    missing = sqlite and not Path(where.tracking_uri.removeprefix("sqlite:///")).exists()  # and opening would make it
    if not args.fresh and not missing and (args.tracking_uri is not None or (where.root / "mlflow.db").exists()):
        tracker = Tracker(where.tracking_uri, cfg.study, where.root / "mlartifacts", read_only=True)
    children = tracker.known if tracker is not None else {}
    return plan(points, eval_ids(cfg), where.storage, children, args.fresh), tracker


def main(argv: list[str] | None = None) -> int:
    from study.interrupt import stop_at_once

    args, lease = parse_args(argv), None
    restore = stop_at_once()  # until the trials run (`Interrupt`) and after them: a signal stops the driver at once
    try:
        check_flags(args)
        if args.tracking_uri is not None:
            from study.tracking import check_tracking_uri

            check_tracking_uri(args.tracking_uri)
        cfg = load_study(args.grid, args.overrides)
        heartbeat_seconds()  # a bad VITSCALE_LEASE_HEARTBEAT_S: one line, before any work
        points = expand(cfg)  # the one expansion of the grid; Tune receives these points
        if args.mfu is not None and not 0 < args.mfu <= 1:
            raise UserError(f"--mfu {args.mfu}: a fraction of the peak, in (0, 1]")
        if args.suggest:  # reads no data: what the study has, from storage and MLflow
            from study.suggest import run_suggest

            return run_suggest(cfg, points, args, args.mfu or ASSUMED_MFU)
        if args.address is not None and (relative := relative_paths(cfg)):  # before any check of the data
            key, value = relative[0]
            raise UserError(f"{key}={value}: a relative path means another folder on each node of a cluster (a "
                            "trial there runs where that node's `ray start` ran); give an absolute path"
                            + (f" (and for {', '.join(k for k, _ in relative[1:])})" if len(relative) > 1 else ""))
        check_folders(cfg, args, create=False)
        checked = check_data(cfg)  # the same checks for a dry run and, before Ray starts, a real one
        if args.dry_run:
            where = Locations(cfg, args)
            where.storage.check(write=False)
            decisions, tracker = read_plan(cfg, points, args, where)
            print_grid(describe(cfg, points, {d.point.id: d.describe() for d in decisions}, args.mfu or ASSUMED_MFU),
                       args.json)
            print_recipes(cfg, args.json)
            print_commands(pipe_commands(cfg), args.json, pipe_specs(cfg))
            print_unchecked(checked, args.json)
            stamped = sum(1 for d in decisions if d.record is not None and d.action in ("reuse", "log", "evaluate")
                          and (d.record.data or any(ev.data for ev in d.record.evals.values())))
            if stamped and not args.json:
                print(f"note: {count(stamped, 'finished point')} kept above: the dry run does not compare the data "
                      "with what they were measured on (it prepares nothing); the run does, before any trial")
        if checked.problems:
            raise UserError("\n".join(f"{args.grid}: {problem}" for problem in checked.problems))
        if args.dry_run:
            if tracker is not None and not args.replace:  # what the real run would refuse, once MLflow is open
                check_nothing_left_out(cfg, points, tracker.known, where.out / "config.yaml", to_dict(cfg))
            return 0
        from study import tune_runner
        from study.lease import Lease
        from study.trial import Stopwatch

        clock: dict[str, float] = {}
        try:
            with Stopwatch(clock)("connect"):
                tune_runner.connect(cfg, args.address, args.verbose)
            stop_at_once()  # again: joining a cluster (`ray.init`) set Ray's SIGTERM handler, a bare exit
            storage = Locations(cfg, args).storage
            storage.check(write=True)
            check_folders(cfg, args, create=True)  # after the checks of --address, resources and storage
            lease = Lease(storage, cfg.study)
            unhear = hear_lease_lost(lease)
            try:
                lease.acquire(force=args.force_unlock)  # one driver per study: a second one stops here, before data
                try:
                    tune_runner.check_nodes_see(storage, lease.token)  # a local --storage every node of a cluster sees
                    with Stopwatch(clock)("prepare_data"):
                        stamps = prepare_data(cfg, storage, tune_runner.index_mapper(args.address))
                    return launch(cfg, points, args, clock, lease, stamps)
                finally:
                    lease.release()
            finally:
                unhear()
        finally:
            tune_runner.disconnect()
    except UserError as err:
        print("\n".join(f"error: {line}" for line in str(err).splitlines()), file=sys.stderr)
        return 2
    except OSError as err:  # the driver's own writes: a full disk, no permission, a read-only folder
        from study.trial import unfixable_by_retry

        if (why := unfixable_by_retry(err)) is None:
            raise
        print(f"error: {why}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:  # a second signal, or one while no trial runs: stop at once
        if lease is not None and lease.lost is not None:  # (Tune re-raises a plain KeyboardInterrupt, not ours)
            print(f"\nerror: another driver took this study's lease ({lease.holder()}); this one stopped its trials "
                  "and wrote nothing more: the study is that driver's now", file=sys.stderr)
            return 1
        signum = getattr(err, "signum", signal.SIGINT)
        print(f"\nerror: stopped by {signal.Signals(signum).name}; rerun the same command to resume (finished points "
              "are kept)", file=sys.stderr)
        return 128 + signum
    finally:
        restore()


# The lease's heartbeat thread raises `LeaseLost` in the main thread through this signal's handler
# (`_thread.interrupt_main`: no signal is sent, and the handler runs where the main thread is, Tune's loop included).
# Not SIGUSR1: Tune takes that one for its own graceful stop while it runs.
LEASE_LOST = signal.SIGUSR2


def hear_lease_lost(lease) -> Callable[[], None]:
    """Install the handler that raises `LeaseLost` in the main thread once `lease` is lost (and not yet released);
    a SIGUSR2 from elsewhere gets the handler that was there before. Returns what puts that one back. A no-op
    outside the main thread, where handlers cannot be set (nor `_thread.interrupt_main` reach)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None  # (and no interrupt: the main thread is not this driver's)
    before = signal.getsignal(LEASE_LOST)
    lease.when_lost(lambda held: _thread.interrupt_main(LEASE_LOST))

    def lost(signum, frame) -> None:
        if lease.lost is not None and not lease.released:
            raise LeaseLost(lease.holder())
        if lease.lost is not None:
            return  # told once more after the driver stopped: nothing left to stop
        if callable(before):
            before(signum, frame)
        elif before == signal.SIG_DFL:  # what SIGUSR2 does by default: end the process
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    signal.signal(LEASE_LOST, lost)
    return lambda: signal.signal(LEASE_LOST, before)


def launch(cfg: StudyConfig, points: list[GridPoint], args: argparse.Namespace, clock: dict[str, float],
           lease=None, stamps=None) -> int:
    from analysis.verdict import Verdict
    from study.identity import eval_ids
    from study.interrupt import STOP, Interrupt
    from study.plan import plan
    from study.storage import redact
    from study.tracking import Tracker, comparison_metrics
    from study.trial import Stopwatch
    from study.tune_runner import ClusterLost

    where = Locations(cfg, args)
    resolved = to_dict(cfg)
    tracker = Tracker(where.tracking_uri, cfg.study, where.root / "mlartifacts", fresh=args.fresh)
    check_one_storage(cfg, tracker, where)
    if not args.fresh and not args.replace:
        check_nothing_left_out(cfg, points, tracker.known, where.out / "config.yaml", resolved)
    where.out.mkdir(parents=True, exist_ok=True)
    (where.out / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    commit = git_commit()
    (where.out / "git_commit.txt").write_text(commit + "\n")
    if lease is not None:  # found taken: drop every MLflow write from then on, before the trials are stopped
        lease.when_lost(lambda held: tracker.abandon())
    evals = eval_ids(cfg)
    decisions = plan(points, evals, where.storage, tracker.known, args.fresh, stamps)
    if stamps is not None and check_changed_data(cfg, decisions, evals, stamps, args.same_data, where.storage):
        decisions = plan(points, evals, where.storage, tracker.known, args.fresh, stamps)  # as restamped
    note_unseen(tracker, decisions)
    print_grid(describe(cfg, points, {d.point.id: d.describe() for d in decisions}, ASSUMED_MFU), as_json=False)
    tags = {"git_commit": commit, "grid_file": str(Path(args.grid).resolve()), STORAGE_TAG: redact(where.storage_root)}
    tracker.start_parent(cfg.study, tags, [where.out / "config.yaml", where.out / "git_commit.txt"],
                         time.strftime("%Y%m%d-%H%M%S"))
    tracker.show(list(cfg.models), headline_columns(cfg))
    status, failures, comparison, note, stopped, lost, left, reported = "FAILED", {}, [], "", None, None, 0, False
    interrupt = Interrupt(where.storage, lease.holds if lease is not None else None)
    where.storage.delete_file(STOP)  # a stop asked of an earlier invocation
    ending = threading.Lock()

    def end() -> None:
        """None of the runs left RUNNING, whatever ended this invocation; once, from the main thread or, where
        Ray holds that, from the cluster watch (`last_words`)."""
        nonlocal left
        ending.acquire()  # never released: a second caller waits while the first ends the study and the process
        tracker.end_started("FAILED" if status == "FINISHED" else status, lost)
        # The report's files only where this invocation wrote them: those of an earlier one (a stopped run's folder)
        # would otherwise reach the parent as if they were this invocation's
        files = [where.out / f for f in ("results.csv", "report.md", "report.html", "summary.json")] if reported else []
        ended = {"failed_points": f"{len(failures)} of {len(points)}" if failures else None, "failure_reason": lost}
        tracker.finish_parent(status, [f for f in files if f.exists()], where.out / "figures" if reported else None,
                              {k: v for k, v in ended.items() if v is not None or status == "FINISHED"},
                              description=note, metrics=comparison)  # (None: removed where set)
        left = tracker.close()
        if lease is not None:  # every write is done: a loss found from here on has nothing left to stop
            lease.release()
        if stopped is not None:  # where the finished points are, and the stop's own line last
            print(f"\nstorage:  {where.storage_root} (checkpoints, weights)", file=sys.stderr)
            _print_tracking(cfg, where, tracker, file=sys.stderr)
            print(stopped, file=sys.stderr)

    def last_words(err: ClusterLost) -> None:
        """Ray's head stopped answering: end the study and exit 1, from the main thread or, where Ray holds that (a
        call to the GCS it retries until it aborts the process), from the cluster watch's."""
        nonlocal lost, stopped
        lost = f"{err}: the points running were lost since their last checkpoint"
        stopped = _lost(err, tracker, where, args.address)
        end()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)

    interrupt.last_words = last_words
    try:
        decisions, records, failures = _run(cfg, decisions, evals, where, tracker, tags, args, clock, interrupt,
                                            lease.token if lease is not None else None, stamps)
        if interrupt.signum is not None:
            status, stopped = "KILLED", _stopped(interrupt, tracker, decisions, records, where)
            return interrupt.exit_code
        with Stopwatch(clock)("report"):
            table = _write_results(cfg, points, records, evals, where, failures)
        reported = True
        comparison = comparison_metrics(table)
        note = study_note(cfg.study, where.out / "summary.json")
        write_timings(where.out / "timings.json", clock, records, decisions)
        status = "FAILED" if failures else "FINISHED"  # FINISHED only when every point is
    except ClusterLost as err:  # Ray's head stopped answering: end every run before Ray's client aborts the driver
        last_words(err)  # (and exit: Ray's shutdown, here or at the interpreter's exit, would wait on the GCS)
    except KeyboardInterrupt:  # a signal that stops the driver at once (`Interrupted`), or a lost lease
        if lease is not None and lease.lost is not None:  # the runs we started are the other driver's to end
            tracker.abandon()
        status = "KILLED"
        raise
    finally:
        end()
    print(f"\nresults:  {where.out / 'results.csv'}\nreport:   {where.out / 'report.md'} (and report.html, "
          f"summary.json)\nfigures:  {where.out / 'figures'}\nstorage:  {where.storage_root} (checkpoints, weights)")
    _print_tracking(cfg, where, tracker)
    if (answer := Verdict.read(where.out / "summary.json")) is not None:
        print(f"\n{answer.text}")
    if left:
        print(f"mlflow:   {left} writes could not be logged (the tracking store was unreachable, full or failing); "
              "the next invocation logs them from the storage", file=sys.stderr)
    if failures:
        print(f"{len(failures)} of {len(points)} trials failed: " +
              "; ".join(f"{name}: {why}" for name, why in failures.items()), file=sys.stderr)
        return 1
    return 0


STORAGE_TAG = "storage"  # the parent's: the storage its driver leases (`study.lease`), and the points live in


def note_unseen(tracker, decisions) -> None:
    """Where the tracking store did not answer when the study was planned, say what that may cost: a point it holds
    (weights logged from another machine's storage) and this storage lacks is planned to train again. Training goes
    on (an outage must not stop a study); the user can stop it."""
    if tracker.unseen and (todo := sum(d.action == "train" for d in decisions)):
        print(f"note: the {todo} points to train were planned from the storage alone ({tracker.uri} did not answer): "
              "any of them the tracking store holds (weights logged from another machine's storage) would be "
              "trained again; if it may, stop with Ctrl-C and rerun once it answers", file=sys.stderr)


def check_changed_data(cfg: StudyConfig, decisions, evals: dict[str, str], stamps, same_data: bool,
                       storage) -> bool:
    """Finished points whose data changed since they were measured (`study.plan.changed_data`). Weights that came
    from other files are never reused silently: refused in one line naming every source that changed, unless
    `--same-data` (the content is the same: files copied or touched), which restamps what the points hold (True:
    the caller plans again). Evaluations on a changed downstream task run again, said in a note.

    Raises:
        UserError: the data a point's weights came from changed.
    """
    from study.plan import changed_data
    from study.protocol import sizes_differ
    from study.storage import PointFiles

    changed = changed_data(decisions, evals, stamps)
    if not changed:
        return False
    if same_data:
        kept = {d.point.id: d for found in changed.values() for d, _ in found}
        for d in kept.values():
            files = PointFiles(d.point.id)
            if d.record is not None:
                d.record.restamp(stamps)
                storage.write_bytes(files.record, d.record.to_json().encode())
            if d.started_on:
                storage.write_bytes(files.data_stamp, json.dumps(stamps.now(d.started_on)).encode())
        print(f"note: --same-data: the results of {count(len(kept), 'point')} measured on "
              f"{', '.join(_source(cfg, key) for key in changed)} are kept, as measured on these files", flush=True)
        return True

    def how(source: str) -> str:
        if any(sizes_differ(stamp, stamps.of(source)) for _, stamp in changed[source]):
            return "files added or removed, or their sizes or content tags changed"
        return "only modification times differ: a copy or a touch, or a rewrite of the same size"

    def since(source: str, it: str = "them") -> str:
        n = len(changed[source])
        did = {"pretrain": f"trained on {it}", "select": f"chose their kept step on {it}",
               "upstream": f"measured upstream top-1 on {it}"}.get(
            source.split("/")[0], f"{'was' if n == 1 else 'were'} evaluated on {it}")
        return f"its files changed since {count(n, 'point')} of this study {did} ({how(source)})"

    if weights := [source for source in changed if source == "pretrain" or source.startswith("select/")]:
        said = [f"{_source(cfg, source)}: {since(source)}" for source in weights]
        said += [f"and {_source(cfg, source)}: {since(source)}" for source in changed if source not in weights]
        raise UserError(f"{'; '.join(said)}. Their results would stand for data they never saw: to train on these "
                        "files beside them, give the study a new name (study=NAME); --fresh trains this study's "
                        "points anew; --same-data keeps the results if the content is the same")
    for source in changed:
        what = "it is measured again" if source == "upstream" else "those evaluations run again"
        print(f"note: {_source(cfg, source)}: {since(source, 'it')}; {what} (--same-data keeps the results if the "
              "content is the same)", flush=True)
    return False


def _source(cfg: StudyConfig, key: str) -> str:
    """How the grid names the split(s) of a `changed_data` key: `data.pretrain (label)` (its train split),
    `data.pretrain (label), its test split`, `downstream[i] (label)` (its train split, for "select/")."""
    if key in ("pretrain", "upstream"):
        return f"data.pretrain ({cfg.data.pretrain.label})" + (", its test split" if key == "upstream" else "")
    label = key.split("/", 1)[1]
    i = next(i for i, task in enumerate(cfg.downstream) if task.label == label)
    return f"downstream[{i}] ({label})" + (", its train split" if key.startswith("select/") else "")


def check_one_storage(cfg: StudyConfig, tracker, where: Locations) -> None:
    """The study's lease lives in its storage, so two drivers of one MLflow study with different storage would not
    see each other, and would both train and write into the same runs. A parent still RUNNING under other storage
    (its driver running, or killed before it could end it) is refused: that storage's lease says which."""
    from study.storage import redact

    theirs = tracker.parent_tags.get(STORAGE_TAG)
    if theirs is not None and "://" not in theirs:  # an earlier release tagged a relative --storage as given
        theirs = os.path.abspath(theirs)
    if tracker.parent_status == "RUNNING" and theirs is not None and theirs != redact(where.storage_root):
        raise UserError(f"study '{cfg.study}' at {tracker.uri} is RUNNING with storage {theirs}, not "
                        f"{redact(where.storage_root)}: another driver may be running it, and the two would train and "
                        f"log the same points. Give --storage {theirs} (its lease tells whether that driver is alive; "
                        f"a dead one's work is resumed), or study=NAME for a study of its own")


def check_nothing_left_out(cfg: StudyConfig, points: list[GridPoint], known: dict, last_config: Path,
                           resolved: dict) -> None:
    """Refuse a grid that leaves out finished points of the study's last run (its MLflow children): its report,
    verdict and MLflow parent would then describe this grid alone, and the finished work would drop out of them.
    Adding points, and changing only the evaluations, leave none out."""
    planned = {p.id for p in points}
    left_out = [pid for pid, child in known.items() if child.complete and pid not in planned]
    if not left_out:
        return
    changed = ""
    if last_config.is_file():
        try:
            before = flatten(yaml.safe_load(last_config.read_text()) or {})
        except (OSError, yaml.YAMLError):
            before = None
        if isinstance(before, dict):
            # by the key an override names each with: a changed task by its field, not as the whole list
            before, now = flatten(before, index_lists=True), flatten(resolved, index_lists=True)
            keys = [k for k in dict.fromkeys([*before, *now]) if before.get(k) != now.get(k)]
            # what can move a point first: an evaluation's settings (`evaluate.`) never leave one out
            keys.sort(key=lambda k: k.startswith("evaluate."))
            shown = "; ".join(f"{k}: {before.get(k, '(unset)')} -> {now.get(k, '(unset)')}" for k in keys[:3])
            changed = f" (changed since: {shown}{'; ...' if len(keys) > 3 else ''})" if keys else ""
    raise UserError(f"study '{cfg.study}' has {len(left_out)} finished point{'s' * (len(left_out) > 1)} this grid "
                    f"leaves out{changed}; its report, verdict and MLflow parent would then show this grid alone. "
                    f"To keep both, give this grid its own name (study=NAME) or --out; to let it be the study, add "
                    f"--replace (the points left out stay in storage and MLflow, and the earlier grid reuses them)")


def _print_tracking(cfg: StudyConfig, where: Locations, tracker, file=None) -> None:
    """Where the MLflow UI shows the study: the command that serves a local store, and the experiment's URL."""
    from study.tracking import runs_url, ui_command

    if (serve := ui_command(where.tracking_uri)) is not None:
        print(f"mlflow:   {serve}   (experiment '{cfg.study}'), then open", file=file)
    if tracker.experiment_id:
        print(f"runs:     {runs_url(where.tracking_uri, tracker.experiment_id)}", file=file)


def _stopped(interrupt, tracker, decisions, records: dict, where) -> str:
    """After a signal: the points left unfinished end KILLED (the parent too, in `launch`). Returns the one line
    that says so, printed once every write is done."""
    left = [d.point for d in decisions if d.point.id not in records]
    tracker.kill_points(left)
    ran = sum(p.id in tracker.begun for p in left)  # the rest were waiting for a free slot
    waiting = f", {len(left) - ran} not started" if ran < len(left) else ""
    return (f"\nstopped by {interrupt.name}: {len(records)} of {len(decisions)} points done, {ran} stopped{waiting} "
            f"(checkpoints in {where.storage_root}); rerun the same command to resume")


def _lost(err, tracker, where, address: str | None) -> str:
    """After `ClusterLost`: the one line that says so, printed once every write is done (the runs this invocation
    started end FAILED in `launch`)."""
    running = len(tracker.begun - tracker.ended)
    again = "once the cluster is back, rerun" if address else "rerun"
    return (f"\nerror: {err}; {running} point{'s' * (running != 1)} running end FAILED in MLflow (their checkpoints "
            f"are in {where.storage_root}): {again} the same command to resume")


def settle(d, evals: dict[str, str], where: Locations, tracker, finisher, records: dict):
    """One planned point before any trial starts: what storage or MLflow holds is taken into `records` (and logged);
    a point whose logged results cannot be fetched trains instead, under a new decision (the plan stays as made)."""
    from dataclasses import replace

    from study.storage import PointFiles

    if d.action == "reuse":
        record = d.record if d.record and not d.record.stale(evals) else tracker.fetch_record(d.child)
        if record is None:  # a complete child without its record (logged by an older version): retrain
            print(f"note: {d.point.name}: its MLflow run holds no record of its results; it trains again", flush=True)
            return replace(d, action="train", evals=dict(evals))
        records[d.point.id] = record
    elif d.action == "log":
        records[d.point.id] = d.record
        finisher(d.point, d.record, curves=True)
    elif d.action == "evaluate" and d.record is None:
        files = PointFiles(d.point.id)
        if not tracker.fetch_weights(d.child, where.storage, files):
            print(f"note: {d.point.name}: its MLflow run holds no weights to re-evaluate; it trains again", flush=True)
            return replace(d, action="train", evals=dict(evals))
        from study.trial import load_record

        return replace(d, record=load_record(where.storage, d.point.id))  # what it held: this invocation adds to it
    return d


def _run(cfg, decisions, evals, where, tracker, tags, args, clock: dict[str, float], interrupt,
         lease_token: str | None = None, stamps=None):
    """Log what storage already holds, run the trials the plan needs (each checks that its node sees the storage
    that holds `lease_token`'s lease); returns the decisions as settled (`settle`), {point id: record} and the
    failures."""
    from study.plan import RUNS
    from study.protocol import Stamps
    from study.storage import PointFiles
    from study.trial import TrialPlan

    finisher = Finisher(cfg, where, tracker, tags)
    records = {}
    decisions = [settle(d, evals, where, tracker, finisher, records) for d in decisions]
    if args.fresh:
        for d in decisions:
            where.storage.delete_dir(PointFiles(d.point.id).folder)
    plans = {d.point.id: TrialPlan(d.point, d.action, d.evals, stamps or Stamps(), d.upstream)
             for d in decisions if d.action in RUNS}
    # A child this invocation logs or runs is its own; only the others left RUNNING are orphans (marking a logged one
    # KILLED from the status read before the logging would undo it).
    tracker.close_orphans(set(plans) | {d.point.id for d in decisions if d.action == "log"})
    failures: dict[str, str] = {}
    if not plans:
        done = f"all {len(decisions)} points are" if len(decisions) > 1 else "the 1 point is"
        print(f"\n{done} done: nothing to train or evaluate; the report is written from what storage and MLflow hold",
              flush=True)
    else:
        from study.tune_runner import StudyCallback, run_trials

        callback = StudyCallback(plans, finisher, tracker, tags)
        clock.update(run_trials(cfg, plans, where.storage, callback, f"{cfg.study}-{time.strftime('%Y%m%d-%H%M%S')}",
                                interrupt, args.verbose, lease_token))
        records.update(callback.records)
        for pid, plan in plans.items():  # (after a signal, a point stopped or not started is no failure)
            if pid not in records and (pid in callback.failures or interrupt.signum is None):
                failures[plan.point.name] = callback.failures.get(pid, "no result reported")
    return decisions, records, failures


def headline_columns(cfg: StudyConfig) -> list[str]:
    """The runs table's metric columns: the headline task's few-shot and fine-tuning top-1, where they run."""
    from study.tracking import headline_name

    sections = {row.name: section for row, section in cfg.evaluate.enabled()}
    shots = sections["fewshot"].shots if "fewshot" in sections else ()
    return [headline_name("fewshot", k) for k in shots] + ([headline_name("finetune", None)] if "finetune" in sections
                                                           else [])


def study_note(title: str, path: Path) -> str:
    """The parent run's description (MLflow shows it atop the run): the verdict and its caveats, then per
    evaluation where each ViT overtakes its ResNet and the gap at both ends of the data range, from the report's
    `summary.json` at `path`."""
    from analysis.fits import interval_text
    from analysis.report import eval_name, fmt, gap_lines
    from analysis.verdict import Verdict

    summary, answer = json.loads(path.read_text()), Verdict.read(path)
    lines = [f"**{title}**: where does the ViT overtake the ResNet? (report: artifact `report.md`)", "",
             *([answer.text.replace("\n", "  \n"), ""] if answer else [])]
    for c in summary["crossovers"]:
        found = {"observed": f"at ~{fmt(c['estimate'])} examples, between {fmt(c['bracket'])}",
                 "extrapolated": f"extrapolated to ~{fmt(c['estimate'])} examples",
                 "fitted": f"the fitted ViT overtakes at ~{fmt(c['estimate'])} examples, inside the measured "
                           "range (the measured means show no ViT overtaking)"}.get(c["status"])
        ci = f" (95% CI {interval_text(c['ci'], c.get('window'), fmt)})" if c.get("ci") else ""
        lines.append(f"- {eval_name(c['eval'], c['dataset'], c['shots'], c['metric'])}, {c['vit']} vs "
                     f"{c['resnet']}: " + (found + ci if found else f"no crossover: {c.get('reason')}"))
    return "\n".join([*lines, "", *(f"- {line}" for line in gap_lines(summary["gaps"]))])


def write_timings(path: Path, clock: dict[str, float], records: dict, decisions) -> None:
    """Where this invocation's time went: the driver's stages (wall seconds) and, summed over the points that ran,
    the trials' stages (seconds of trial time; trials run side by side, so these add up to more than the wall)."""
    from study.plan import RUNS

    ran = {}  # a record's timings add up over every invocation that worked on it: this one's are what it added
    for d in decisions:
        if d.action in RUNS and d.point.id in records:
            before = d.record.timings if d.record is not None else {}
            added = {k: v - before.get(k, 0.0) for k, v in records[d.point.id].timings.items()}
            ran[d.point.id] = {k: v for k, v in added.items() if v > 0}
    trials: dict[str, float] = {}
    for timings in ran.values():
        for stage, seconds in timings.items():
            trials[stage] = trials.get(stage, 0.0) + seconds
    path.write_text(json.dumps({"driver_wall_s": clock, "trial_s": trials, "points_ran": len(ran),
                                "per_point_s": ran}, indent=1))
    print("\ntime (s): " + ", ".join(f"{k} {v:.0f}" for k, v in clock.items()) +
          (f" | summed over {len(ran)} trials: " + ", ".join(f"{k} {v:.0f}" for k, v in trials.items()) if ran else ""))


class Finisher:
    """A finished point: its Fig 7 panel drawn from the stored arrays, then everything logged to its child run."""

    def __init__(self, cfg: StudyConfig, where: Locations, tracker, tags: dict):
        from study.identity import eval_ids, eval_params

        self.cfg, self.where, self.tracker, self.tags = cfg, where, tracker, tags
        self.params, self.evals = eval_params(cfg), eval_ids(cfg)  # the evaluation recipe, on every child

    def __call__(self, point: GridPoint, record, ran: tuple[str, ...] | None = None, curves: bool = False) -> None:
        """`ran`: the evaluations whose metrics are logged; left out, those of the record that the study asks for
        now (not those of a task or evaluation it has since dropped, or of another protocol). `curves`: the point's
        stored curves too, those its run lacks (a point logged from storage, whose live writes were lost)."""
        from study.storage import PointFiles
        from study.trial import read_curves

        current = tuple(k for k, ev in record.evals.items() if self.evals.get(k) == ev.id)
        if ran is None:
            ran = current
        else:  # and those an earlier invocation ran but never logged (stopped, killed, the tracking server down)
            logged = self.tracker.logged_evals(point)
            ran = tuple(dict.fromkeys([*ran, *(k for k in current if logged.get(k) != record.evals[k].id)]))
        if curves:
            self.tracker.log_history(point, read_curves(self.where.storage, PointFiles(point.id).curves), self.tags)
        panel = fig7_panel(point, self.where, self.where.out / "figures" / "points")
        self.tracker.finish_point(point, record, self.where.storage, ran, [panel] if panel else [], self.tags,
                                  headline_task=self.cfg.downstream[0].label, params=self.params)


def fig7_panel(point: GridPoint, where: Locations, folder: Path) -> Path | None:
    """A ViT's Fig 7 panels, drawn by the driver from the arrays its trial stored."""
    from analysis.plots import fig7_panels
    from pipelines import diagnostics
    from study.storage import PointFiles

    raw = where.storage.read_bytes(PointFiles(point.id).fig7)
    if raw is None:
        return None
    # Named by content (the point and its arrays: diagnostics re-measured with other settings draw anew): drawn once
    stem = f"fig7_{point.name}_{point.id[:8]}"
    path = folder / f"{stem}_{hashlib.sha256(raw).hexdigest()[:8]}.png"
    if path.exists() and _whole_png(path):  # (an older release, killed while drawing, could leave a partial one)
        return path
    for old in folder.glob(f"{stem}*.png"):  # the point's panel of arrays it no longer holds
        old.unlink(missing_ok=True)
    return fig7_panels(diagnostics.from_bytes(raw), path, f"{point.model}, {point.subset_size:,} pretraining examples")


def _whole_png(path: Path) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
        return True
    except (OSError, SyntaxError):  # PIL: unidentified or truncated (SyntaxError for some corrupt headers)
        return False


def results_table(cfg: StudyConfig, points: list[GridPoint], records: dict, evals: dict[str, str]):
    """The tidy table of the grid's finished points: every measurement of the current evaluation protocols, and
    each point's upstream top-1 (`results.UPSTREAM`), with every dataset's chance top-1."""
    from analysis import results
    from pipelines.downstream import Measurement

    chance = {"pretrain": 100 / cfg.data.pretrain.num_classes, **{t.label: 100 / t.num_classes for t in cfg.downstream}}

    def measured(record) -> list:
        upstream = record.pretrain.val_top1 if record.pretrain else None
        return record.measurements(evals) + (
            [] if upstream is None else [Measurement(results.UPSTREAM, "pretrain", None, "top1", upstream)])

    return results.build_table([row for p in points if p.id in records
                                for row in results.rows(p.table_fields, measured(records[p.id]), chance)])


def _write_results(cfg, points, records, evals, where, failures: dict[str, str]):
    """results.csv and the report over every point of the current grid, old and new together; returns the table."""
    from analysis import plots, report, results

    table = results_table(cfg, points, records, evals)
    results.write(table, where.out / "results.csv")
    folder = where.out / "figures"
    by_model: dict[str, list[tuple[int, Path]]] = {}
    for p in points:
        if p.id in records and (path := fig7_panel(p, where, folder / "points")) is not None:
            by_model.setdefault(p.model, []).append((p.subset_size, path))
    panels = plots.fig7_side_by_side(by_model, folder)
    report.write_report(table, where.out, title=cfg.study, failures=failures, panels=panels)
    return table


if __name__ == "__main__":
    from study.cli import exit_now

    exit_now(main())

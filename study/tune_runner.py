"""Ray Tune, kept behind one small module: a local Ray started and stopped here (or `--address` to join a
cluster), one trial per planned grid point (Tune receives the expanded points, it does not expand a grid), a
driver-side callback that turns the trials' typed events into MLflow writes and records, and the study's console
(`study.console`) in place of Tune's status table unless `verbose`."""

from __future__ import annotations

import _thread
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import ray
from ray import tune
from ray.tune import Callback
from ray.tune.logger import JsonLoggerCallback
from ray.tune.progress_reporter import TrialProgressCallback

from pipelines.config import UserError, count, first_line
from study.config import StudyConfig
from study.console import Console, error_text
from study.interrupt import Interrupt, keep_sigterm, ray_apart, stop_at_once
from study.protocol import Curve, Failed, Finished, PointRecord, Started, Stopped, decode
from study.storage import Storage
from study.tracking import Tracker
from study.trial import TrialPlan, trainable


class StudyCallback(Callback):
    """Per trial: Started -> child run and params, Curve -> metrics at the step, Finished -> the record, final
    metrics and artifacts, Failed (or a crash Tune gave up on) -> the reason.

    It runs on Tune's loop, which waits for it (and a trial's next report waits for Tune): MLflow writes are queued
    to the tracker's thread, and `on_finished` (drawing figures, reading stored files, ~1 s) runs on a thread of
    its own; `close` waits for it."""

    def __init__(self, plans: dict[str, TrialPlan], on_finished, tracker: Tracker, tags: dict):
        self.plans, self.on_finished, self.tracker, self.tags = plans, on_finished, tracker, tags
        self.records: dict[str, PointRecord] = {}
        self.failures: dict[str, str] = {}
        self.finishing = ThreadPoolExecutor(1, thread_name_prefix="study-finish")
        self.pending: list[Future] = []

    def __getstate__(self) -> dict:
        # Tune pickles its callbacks into the experiment state; this study never restores a Tuner (it re-plans
        # from MLflow and storage), so the live tracker and the threads stay out of that file.
        live = ("tracker", "on_finished", "finishing", "pending")
        return {k: v for k, v in self.__dict__.items() if k not in live}

    def _point(self, trial):
        return self.plans[trial.config["point"]].point

    def on_trial_result(self, iteration, trials, trial, result, **info):
        event, point = decode(result), self._point(trial)
        match event:
            case Started(params=params, metrics=metrics):
                self.tracker.start_point(point, params, metrics, self.tags)
            case Curve(prefix=prefix, step=step, values=values):
                self.tracker.log_curve(point, prefix, step, values)
            case Finished(record=record):
                self.records[point.id] = record
                self.pending.append(self.finishing.submit(self.on_finished, point, record,
                                                          tuple(self.plans[point.id].evals), True))
            case Failed(reason=reason):
                self.failures[point.id] = reason
                self.tracker.fail_point(point, reason, self.tags)
            case Stopped(reason=reason):  # not a failure: the driver's `_stopped` ends its run KILLED
                self.tracker.note_stop(point, reason)

    def on_trial_error(self, iteration, trials, trial, **info):
        point = self._point(trial)
        self.failures[point.id] = error_text(trial)
        self.tracker.fail_point(point, self.failures[point.id], self.tags)

    def close(self) -> None:
        """Wait for the finished points' work; an error there is raised here, as it was on Tune's loop."""
        self.finishing.shutdown(wait=True)
        for done in self.pending:
            done.result()


def connect(cfg: StudyConfig, address: str | None, verbose: bool = False) -> None:
    """Check that the study can run where it is asked to, before any data or run exists: join the cluster at
    `address` (host:port or `auto`; Ray Client's `ray://` is refused) and check that one node can place a trial's
    worker; with no address, check this machine (the local Ray itself starts only when a trial runs)."""
    if address is None:
        import torch

        _check_fits(cfg, [{"CPU": os.cpu_count() or 1, "GPU": torch.cuda.device_count()}], "this machine")
        if (other := cluster_here()) is not None:
            named = f"RAY_ADDRESS={other}" if os.environ.get("RAY_ADDRESS") else f"{other}, started by `ray start`"
            print(f"note: a Ray cluster is running here ({named}); this study starts a Ray of its own on this "
                  "machine: to run on that cluster, pass --address auto", file=sys.stderr)
        return
    target = _resolve(address)
    _check_listening(address, target)
    _match_auth(address, f"{target[0]}:{target[1]}")
    try:  # the resolved address: Ray's own `auto` could pick another Ray than the one checked above
        with keep_sigterm():  # the driver's handler (`stop_at_once`), not Ray's bare exit
            ray.init(address=f"{target[0]}:{target[1]}", logging_level="warning", configure_logging=True,
                     log_to_driver=verbose)
    except Exception as err:  # noqa: BLE001  (Ray raises ConnectionError, RuntimeError, AuthenticationError, ...)
        raise UserError(f"--address {address}: could not join the Ray cluster: {first_line(err)}") from None
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    try:
        _check_fits(cfg, nodes, f"the cluster at {address}")
    except UserError:
        ray.shutdown()
        raise


SEE_TIMEOUT = 60.0  # seconds the nodes have to answer whether they see the storage


def check_nodes_see(storage: Storage, token: str) -> None:
    """On a joined cluster, a local storage folder must be one that every node sees at the same path: a trial placed
    on a node that does not would keep its checkpoints and weights on that node's own disk, out of the driver's
    reach (its point tagged as having weights, and trained again by the next run). Each alive node reads the lease
    this driver has just written there, in a task pinned to it that takes no CPU; a node that does not answer in
    `SEE_TIMEOUT` gets a note (its trials check for themselves: `lease.check_shared`). Nothing to check for an
    object store, or without a joined cluster (the study's own Ray is this machine).

    Raises:
        UserError: naming the nodes that see another folder, or none.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from study.lease import not_shared, sees_lease

    if (local := storage.local_path("")) is None or not ray.is_initialized():
        return
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2:
        return
    read = ray.remote(num_cpus=0, max_retries=0)(sees_lease)
    root = str(local)
    refs = {read.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
        root, token): n for n in nodes}
    ready, silent = ray.wait(list(refs), num_returns=len(refs), timeout=SEE_TIMEOUT)
    for ref in silent:
        ray.cancel(ref, force=True)
    blind, other, unchecked = [], False, [(refs[ref], f"no answer in {SEE_TIMEOUT:.0f} s") for ref in silent]
    for ref in ready:
        try:
            if (found := ray.get(ref)) != token:
                blind.append(_node_name(refs[ref]))
                other = other or found is not None
        except Exception as err:  # noqa: BLE001  (a worker that could not start there, a read error: Ray's vary)
            unchecked.append((refs[ref], first_line(err)[:200]))
    if blind:
        raise UserError(not_shared(storage, f"{count(len(blind), 'node')} of {len(nodes)} ({', '.join(blind)})",
                                   many=len(blind) > 1, other=other))
    for node, why in unchecked:
        print(f"note: could not check whether node {_node_name(node)} sees the storage {storage.root} ({why}); a "
              "trial placed there checks for itself", file=sys.stderr)


def _node_name(node: dict) -> str:
    return f"{node.get('NodeManagerAddress', '?')} ({node.get('NodeManagerHostname', '?')}, node {node['NodeID'][:8]})"


def cluster_here() -> str | None:
    """The address of the Ray cluster this machine names: RAY_ADDRESS, else the one `ray start` recorded; None if
    neither. It is what `--address auto` joins, and what a bare `ray.init()` would join instead of starting a Ray.
    Not any Ray found running, as Ray's own `auto` falls back to: that may be another program's private Ray."""
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    from ray._private.services import find_bootstrap_address

    try:
        return find_bootstrap_address(None) or None
    except Exception:  # noqa: BLE001  (an unreadable record names no cluster)
        return None


def _record_dir() -> str:
    from ray._private.utils import get_ray_address_file

    return os.path.dirname(get_ray_address_file(None))


def heads_elsewhere() -> list[tuple[str, str]]:
    """(address, temp dir) of the heads `ray start --head --temp-dir DIR` started on this machine, whose record is in
    DIR rather than where `auto` looks: found by their GCS processes, whose session folder's parent holds the
    record. A private Ray (`ray.init()`, another program's) writes none, and is not listed."""
    import psutil

    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        try:
            if proc.info["name"] != "gcs_server":
                continue
            session = next((a.split("=", 1)[1] for a in proc.info["cmdline"] or [] if a.startswith("--session-dir=")),
                           None)
            record = Path(session).parent / "ray_current_cluster" if session else None
            if record is not None and str(record.parent) != _record_dir() and record.is_file():
                found.append((record.read_text().strip(), str(record.parent)))
        except (psutil.Error, OSError):
            continue
    return sorted(set(found))


def start_local(verbose: bool = False) -> None:
    """This machine's own Ray, whatever RAY_ADDRESS or an earlier `ray start` say (`address="local"`): without
    --address the study runs here, as it says; a bare `ray.init(num_cpus=...)` would try to join that cluster and
    fail. Its processes are deaf to SIGINT and SIGTERM (`ray_apart`).

    `log_to_driver` (here and in `connect`) only where `verbose`: the trials print nothing of their own (their events
    reach the console through Tune), so what Ray forwards from its actors is its own machinery's: Ray Train's
    controller and placement-group cleaner (193 lines, three tracebacks, for one rank killed in a data-parallel
    point whose study then finished) and worker processes' stacks. The console prints one line for each of those
    events; each process's output stays in the Ray session's log files on its node."""
    logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(_not_the_default_auth_note)
    with ray_apart():
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, configure_logging=True,
                 logging_level="warning", log_to_driver=verbose)


def cluster_errors_in_one_line() -> None:
    """Ray prints the errors its cluster reports to the driver (a node marked dead, a raylet that ended) as they come,
    the raylet's with its last 20 log lines and a state dump below: for a lost node, 24 lines of C++ internals in the
    middle of the console. Only each message's first line is printed (the node and what happened); the rest stays in
    the node's raylet log. A no-op where Ray's printer is not where it was (Ray 2.60: `worker.print_to_stdstream`,
    which the thread that listens for these errors calls by its module name)."""
    from ray._private import worker

    printer = getattr(worker, "print_to_stdstream", None)
    if printer is None or getattr(printer, "_vitscale", False):
        return

    def first_lines(data, ignore_prefix: bool):
        if data.get("pid") == "raylet" and isinstance(data.get("lines"), list):
            data = {**data, "lines": [str(line).strip().splitlines()[0] for line in data["lines"] if str(line).strip()]}
        return printer(data, ignore_prefix)

    first_lines._vitscale = True
    worker.print_to_stdstream = first_lines


def _not_the_default_auth_note(record: logging.LogRecord) -> bool:
    """Ray >= 2.59 warns at every start of a local Ray that it turned token authentication on by default; for the
    study's own Ray, on this machine and gone when the study ends, that is not something to act on."""
    return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


def index_mapper(address: str | None):
    """Where a study joins a cluster, source indexes are built by Ray tasks across it (one task per run of shards,
    results merged on the driver); on one machine, by a process pool (`pipelines.data.scan.build`)."""
    if address is None or not ray.is_initialized():
        return None

    def cluster_map(fn, jobs):
        task = ray.remote(num_cpus=1)(fn)
        refs = [task.remote(job) for job in jobs]
        for ref in refs:
            yield ray.get(ref)

    return cluster_map


def _resolve(address: str) -> tuple[str, int]:
    """(host, port) to probe; `auto` is the cluster `ray start` recorded on this machine (or RAY_ADDRESS)."""
    if address == "auto":
        found = cluster_here()
        if not found:
            others = heads_elsewhere()
            raise UserError(f"--address auto: no Ray cluster is recorded on this machine (RAY_ADDRESS, or `ray "
                            f"start`'s record in {_record_dir()}); " + (
                                "start one with `ray start --head`, or give --address host:port" if not others else
                                "heads started with another --temp-dir run here: "
                                f"{', '.join(f'{a} ({d})' for a, d in others)}: give --address {others[0][0]}"))
        address = found
    if address.startswith("ray://"):
        raise UserError(f"--address {address}: Ray Client (ray://) is not supported: the study's Tune callback and "
                        "storage live on the driver. Run the driver on the cluster: `ray job submit --address "
                        "http://HEAD:8265 --working-dir . -- python -m study.run --grid G --address auto ...`")
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"--address {address!r} is not host:port or auto")
    return host, int(port)


def _check_listening(address: str, target: tuple[str, int]) -> None:
    """Something answers at `target`, and speaks gRPC (HTTP/2), as a Ray GCS does: Ray's client would otherwise
    retry for minutes against a web server or a database."""
    try:
        with socket.create_connection(target, timeout=5) as conn:
            conn.settimeout(5)
            conn.sendall(HTTP2_PREFACE)
            reply = conn.recv(9)
    except TimeoutError:
        reply = b""
    except OSError as err:
        raise UserError(f"--address {address}: nothing answers at {target[0]}:{target[1]} ({err.strerror or err}); "
                        "start the head with `ray start --head --port PORT`, or drop --address to run "
                        "locally") from None
    if len(reply) < 9 or reply[3] != 0x04:  # an HTTP/2 server answers the preface with a SETTINGS frame
        raise UserError(f"--address {address}: {target[0]}:{target[1]} answers, but not as a Ray cluster (no "
                        "gRPC); give the head's GCS port (`ray start --head --port PORT`, 6379 by default)")


# The HTTP/2 connection preface and an empty SETTINGS frame: what a gRPC client sends first.
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def _match_auth(address: str, gcs: str) -> None:
    """Ask the cluster whether it wants a token, and talk to it the way it asks: a GCS that uses token
    authentication refuses a call without one at once. (Ray >= 2.59 turns it on for heads started with `ray start`
    where a token exists, and a client does not follow by itself: it fails with InvalidAuthToken after 20 s.)"""
    from ray.exceptions import AuthenticationError

    explicit = os.environ.get("RAY_AUTH_MODE")
    set_auth_mode("disabled")
    try:
        _ping(gcs, address)
        return  # no token asked for: none is sent
    except AuthenticationError:
        pass
    where = f"--address {address}: the cluster uses token authentication"
    if explicit == "disabled":
        raise UserError(f"{where}, but RAY_AUTH_MODE=disabled here: unset it and give the cluster's token "
                        f"({TOKEN_HELP})")
    if not _token_available():
        raise UserError(f"{where} and this machine has no token: {TOKEN_HELP}")
    set_auth_mode("token")
    try:
        _ping(gcs, address)
    except AuthenticationError:
        raise UserError(f"{where} and refused this machine's token: {TOKEN_HELP}") from None


TOKEN_HELP = "copy the head's ~/.ray/auth_token here, or set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH)"


def _ping(gcs: str, address: str) -> None:
    """One cheap call to the cluster's GCS (raises AuthenticationError when it wants another token). Ray's C++ client
    logs a refused call on the process's stderr ("Failed to get cluster ID from GCS server: Unauthenticated ...", a
    warning on every run against a cluster with tokens, whose first probe goes without one): the probe's answer is
    what counts, so that stream is muted while it runs."""
    from ray._raylet import GcsClient
    from ray.exceptions import AuthenticationError

    try:
        with _native_stderr_muted():
            GcsClient(address=gcs).internal_kv_exists(b"vitscale-auth-probe", namespace=None, timeout=10)
    except AuthenticationError:
        raise
    except Exception as err:  # noqa: BLE001  (a GCS that does not answer: RpcError, TimeoutError, ...)
        code = getattr(err, "rpc_code", None)
        if code == 12:  # UNIMPLEMENTED: a gRPC server without the GCS's services (a raylet's or an agent's port)
            raise UserError(f"--address {address}: {gcs} answers gRPC, but not as a Ray cluster's GCS; give "
                            "the head's GCS port (`ray start --head --port PORT`, 6379 by default)") from None
        why = " ".join(str(err).split())[:200] or type(err).__name__
        named = f"gRPC status {code} ({_GRPC_CODES[code]}): " if code in _GRPC_CODES else ""
        raise UserError(f"--address {address}: the cluster's GCS at {gcs} did not answer: {named}{why}"
                        ) from None


_GRPC_CODES = {4: "deadline exceeded", 14: "unavailable", 13: "internal", 2: "unknown", 8: "resource exhausted"}


@contextmanager
def _native_stderr_muted() -> Iterator[None]:
    """File descriptor 2 goes to /dev/null while the block runs (what C++ code writes there; Python's `sys.stderr`
    is flushed first and writes there too)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def set_auth_mode(mode: str) -> None:
    """What `ray start` does when it finds a token: the mode for this process (and the processes it starts), and
    Ray's cached config refreshed."""
    os.environ["RAY_AUTH_MODE"] = mode
    try:
        from ray._raylet import Config

        Config.initialize("")
    except (ImportError, AttributeError):  # an older Ray reads the variable when it connects
        pass


def _not_slow_warning(record: logging.LogRecord) -> bool:
    return "may be a performance bottleneck" not in record.getMessage()


def _trial_task_failed(record: logging.LogRecord) -> bool:
    """Tune logs a crashed trial's traceback ("Trial task failed for trial X", a lost node's included) before it
    retries or fails it; the study's console prints its own line for each (`Console.on_trial_recover` and
    `on_trial_error`), and the traceback stays in the trial's error file in storage."""
    return not record.getMessage().startswith("Trial task failed for trial")


def _one_line_when_unfixable(record: logging.LogRecord) -> bool:
    """Tune logs a traceback each time it cannot save its state to storage; where the cause is one a retry cannot
    fix (a full disk), the trial's own line says what to do: keep Tune's message, drop the stack."""
    from study.trial import unfixable_by_retry

    err = record.exc_info[1] if record.exc_info else None
    if isinstance(err, OSError) and unfixable_by_retry(err) is not None:
        record.msg, record.args, record.exc_info, record.exc_text = (
            f"{record.getMessage().rstrip(': ')}: {first_line(err)}", None, None, None)
    return True


def _token_available() -> bool:
    return bool(os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
                or (Path.home() / ".ray" / "auth_token").exists())


def _check_fits(cfg: StudyConfig, nodes: list[dict], where: str) -> None:
    """A trial's worker must fit on one node, or Tune leaves it PENDING forever."""
    r = cfg.resources
    need = {"CPU": r.cpus_per_worker, "GPU": r.gpus_per_worker}
    for kind, amount in need.items():
        most = max((n.get(kind, 0) for n in nodes), default=0)
        if amount > most:
            key = "cpus_per_worker" if kind == "CPU" else "gpus_per_worker"
            raise UserError(f"resources.{key}={amount:g}: a trial's worker needs {count(amount, kind)} on one node, "
                            f"but {where} has at most {most:g}; lower it or add a bigger node")
    places = sum(min((n.get(k, 0) // v) if v else r.workers_per_trial for k, v in need.items()) for n in nodes)
    if places < r.workers_per_trial:
        raise UserError(f"resources.workers_per_trial={r.workers_per_trial}: {where} can place at most "
                        f"{count(int(places), 'worker')} of {count(r.cpus_per_worker, 'CPU')} and "
                        f"{count(r.gpus_per_worker, 'GPU')}; "
                        "lower it or add nodes")


def run_trials(cfg: StudyConfig, plans: dict[str, TrialPlan], storage: Storage, callback: StudyCallback,
               name: str, interrupt: Interrupt, verbose: bool = False, lease_token: str | None = None
               ) -> dict[str, float]:
    """Run one Tune trial per plan; results arrive through `callback`. Starts a local Ray unless `connect`
    joined a cluster (its processes deaf to SIGINT and SIGTERM: `interrupt` handles those, after Ray is up).
    Progress shows as the study's console lines, or as Tune's status table where `verbose`.
    Returns the seconds spent starting Ray and running the trials."""
    start = time.perf_counter()
    quiet_tune(verbose)
    own = not ray.is_initialized()
    if own:
        start_local(verbose)
    if not verbose:
        cluster_errors_in_one_line()
    interrupt.install()  # after ray.init
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # the study stops its trials itself (study/interrupt.py)
    # Of Tune's own per-trial logs only result.json (`output`), which Tune reads back for the `ResultGrid`: the
    # study's record is MLflow and its storage. Writing every reported result also as CSV and TensorBoard events on
    # Tune's loop cost the driver 1.9 s of CPU in the default study (getrusage: 33.9 -> 32.0 s; the same wall time)
    # and put 48 more files (1.7 of 3.9 MB) in the study's storage, which a cluster's storage syncs.
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    # A trial runs in the working directory of the Ray that runs it (the driver's, for the study's own Ray; Tune
    # passes the variable to every trial), not in a folder of Tune's: a relative path of the grid (`data.cache_dir`,
    # a source's root or shards) means there what it means to the driver that checked it. (A relative --storage is
    # made absolute: `Storage`; on a joined cluster, where nodes run where `ray start` ran, the driver refuses other
    # relative paths: `run.main`.)
    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"
    started = time.perf_counter()
    r = cfg.resources
    if r.workers_per_trial == 1:
        resources = {"cpu": r.cpus_per_worker, "gpu": r.gpus_per_worker}
        concurrent = r.max_concurrent_trials or None
    else:  # the trial only drives its Ray Train run, whose workers hold the resources (gang-scheduled)
        resources = {"memory": 1 << 20}  # Tune needs a non-empty request; a driver uses no CPU to speak of
        concurrent = r.max_concurrent_trials or _trials_that_fit(r)
    fn = tune.with_parameters(trainable, plans=plans, cfg=cfg, storage_root=storage.root, lease_token=lease_token)
    tuner = tune.Tuner(
        tune.with_resources(fn, resources),
        param_space={"point": tune.grid_search(list(plans))},
        # reuse_actors: a finished trial's process runs the next one, so torch, timm and the pipeline are imported
        # once per slot, not once per point (~8 s of CPU each on a small machine); every trial seeds its own RNGs.
        tune_config=tune.TuneConfig(max_concurrent_trials=concurrent, reuse_actors=True,
                                    trial_name_creator=TrialNames(plans), trial_dirname_creator=TrialNames(plans)),
        run_config=tune.RunConfig(name=name, **storage.for_ray("tune"),
                                  failure_config=tune.FailureConfig(max_failures=cfg.resources.max_failures),
                                  **output(verbose, callback, Console(plans, cfg.downstream[0].label,
                                                                      concurrent or 1))),
    )
    watch = ClusterWatch(ray.get_runtime_context().gcs_address, interrupt.last_words, own=own)
    watch.start()
    try:
        tuner.fit()
    finally:
        watch.stop()
        stop_at_once()  # no trial runs now: a signal stops the driver at once (main puts the handlers back)
        callback.close()
    return {"ray_start": started - start, "trials": time.perf_counter() - started}


def output(verbose: bool, callback: StudyCallback, console: Console) -> dict:
    """What Tune shows and logs (`RunConfig` arguments): the study's console and Tune silent, or (`verbose`) Tune's
    own status table with the trials' progress; either way Tune's only log of its own is each trial's result.json
    (`run_trials` turns the CSV and TensorBoard ones off)."""
    if verbose:
        return {"callbacks": [callback, JsonLoggerCallback()], "progress_reporter": status_table(), "verbose": 1}
    return {"callbacks": [callback, console, JsonLoggerCallback(), SilentTrialProgress()], "progress_reporter": None,
            "verbose": 0}


class SilentTrialProgress(TrialProgressCallback):
    """Tune's per-trial printer, silenced. Tune adds one where none is given, and at verbose 0 it still prints
    "Trial X completed. Last result: " for a trial that ended without a result (one the driver's stop ended before
    it started, `NotStarted`), which reads as if it had run."""

    def _print(self, msg: str) -> None:
        pass


def quiet_tune(verbose: bool = False) -> None:
    """Tune's reporter API (`RunConfig.progress_reporter` and `verbose`), set before Tune reads it: the newer AIR
    output ignores the reporter, and prints a configuration box and a TensorBoard hint at any verbosity. Unless
    `verbose`, Tune's logs of what the console already says, or what nobody can act on, are left out."""
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    logging.getLogger("ray.tune.execution.experiment_state").addFilter(_one_line_when_unfixable)
    if not verbose:  # the console says it in one line ("crashed, retried ..." or the failure): no stack beside it
        logging.getLogger("ray.tune.execution.tune_controller").addFilter(_trial_task_failed)
        # Tune's "The `process_trial_result` operation took 0.612 s, which may be a performance bottleneck": its
        # loop's own pace (the study's writes are queued off it), nothing a user of the study can act on
        logging.getLogger("ray.tune.utils.util").addFilter(_not_slow_warning)


def status_table() -> tune.CLIReporter:
    """Tune's status table (`--verbose`), with each trial's stage, step, images/s and ETA (the `Progress` its
    events carry) as columns, every 30 s."""
    return tune.CLIReporter(metric_columns={"stage": "stage", "step": "step", "steps": "of", "images_per_s": "images/s",
                                            "eta_s": "eta (s)"}, max_report_frequency=30)


def _trials_that_fit(r) -> int:
    """Data-parallel points the cluster can run at once, so Tune does not start drivers whose workers must wait."""
    have = ray.cluster_resources()
    fits = [have.get(k, 0) // (v * r.workers_per_trial) for k, v in (("CPU", r.cpus_per_worker),
                                                                    ("GPU", r.gpus_per_worker)) if v]
    return max(1, int(min(fits, default=1)))


def disconnect() -> None:
    if ray.is_initialized():
        ray.shutdown()


# The watch's thread raises `ClusterLost` in the main thread through this signal's handler (`_thread.interrupt_main`:
# no signal is sent). The lease's signal (`study.run.LEASE_LOST`); each handler passes on what is not its own.
CLUSTER_LOST = signal.SIGUSR2


class ClusterLost(KeyboardInterrupt):
    """Ray's GCS (the cluster's head) stopped answering while trials ran. Ray's own client in the driver would abort
    the process `gcs_rpc_server_reconnect_timeout_s` (60 s) after, with a C++ log line and every MLflow run left
    RUNNING; the study ends first, its runs FAILED with the reason, and exits 1 with one line."""

    def __init__(self, head: str, seconds: float):
        super().__init__(head)
        self.head, self.seconds = head, seconds

    def __str__(self) -> str:
        return f"{self.head} stopped answering {self.seconds:.0f} s ago"


def reconnect_timeout() -> float:
    """How long Ray's clients wait for a GCS that does not answer before they abort their process (Ray's default, or
    the `RAY_gcs_rpc_server_reconnect_timeout_s` a cluster with a restartable GCS sets)."""
    try:
        return max(2.0, float(os.environ.get("RAY_gcs_rpc_server_reconnect_timeout_s", "60")))
    except ValueError:
        return 60.0


class ClusterWatch:
    """While trials run, open a TCP connection to the GCS every `every` seconds. One that has refused (or timed
    out) for `grace` seconds (half of Ray's reconnect timeout: a GCS that restarts comes back within it; the other
    half is the driver's to end its runs) is lost: `ClusterLost` is raised in the main thread, or, where Ray holds
    that thread, `stuck` ends the study from the watch's. A note is printed once the GCS has not answered for `note`
    seconds, and another if it answers again.

    Nothing the trials still hold can be saved by then: Tune's loop in the driver waits on the GCS, and each trial
    waits in its next `report` for that loop, so what a lost point keeps is its last periodic checkpoint."""

    def __init__(self, gcs: str, stuck: Callable[[ClusterLost], None] | None = None, grace: float | None = None,
                 every: float = 1.0, note: float = 5.0, heard_within: float = 3.0, own: bool = False):
        self.gcs, self.stuck, self.every, self.note, self.heard_within = gcs, stuck, every, note, heard_within
        self.head = f"{'this study' if own else 'the cluster'}'s Ray head (GCS at {gcs})"  # `own`: started here
        self.grace = grace if grace is not None else reconnect_timeout() / 2
        self.lost: ClusterLost | None = None
        self._raised, self._stop = threading.Event(), threading.Event()
        self._before = None
        self._thread = threading.Thread(target=self._watch, name="cluster-watch", daemon=True)

    def answers(self) -> bool:
        host, _, port = self.gcs.rpartition(":")
        try:
            with socket.create_connection((host, int(port)), timeout=min(2.0, self.every * 2)):
                return True
        except (OSError, ValueError):
            return False

    def start(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._before = signal.getsignal(CLUSTER_LOST)
            signal.signal(CLUSTER_LOST, self._heard)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._before is not None:
            signal.signal(CLUSTER_LOST, self._before)
            self._before = None

    def _heard(self, signum: int, frame) -> None:
        if self.lost is not None and not self._raised.is_set():
            self._raised.set()
            raise self.lost
        if callable(self._before):
            self._before(signum, frame)

    def _watch(self) -> None:
        down, noted = None, False
        while not self._stop.wait(self.every):
            if self.answers():
                if noted:
                    print(f"ray: {self.head} answers again", file=sys.stderr, flush=True)
                down, noted = None, False
                continue
            now = time.monotonic()
            down = down if down is not None else now - self.every / 2  # it went some time since the last answer
            if not noted and now - down >= self.note:
                noted = True
                print(f"ray: {self.head} has not answered for {now - down:.0f} s; the study "
                      f"ends at {self.grace:.0f} s unless it answers again", file=sys.stderr, flush=True)
            if now - down >= self.grace and not self._stop.is_set():
                self.lost = ClusterLost(self.head, now - down)
                _thread.interrupt_main(CLUSTER_LOST)
                # Tune's loop may be inside a call to the GCS, which Ray retries in C++ (the GIL released) until it
                # aborts the process: then the main thread never hears, and `stuck` ends the study from here.
                if not self._raised.wait(self.heard_within) and self.stuck is not None:
                    self.stuck(self.lost)
                return


class TrialNames:
    """Tune's trial names: the grid point's readable name (a picklable callable, not a lambda)."""

    def __init__(self, plans: dict[str, TrialPlan]):
        self.names = {pid: plan.point.name for pid, plan in plans.items()}

    def __call__(self, trial) -> str:
        return self.names[trial.config["point"]]

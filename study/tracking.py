"""MLflow as the study's record, kept behind one small module.

One parent run per study name, reused by every invocation (`--fresh` starts a new one); one child run per grid
point, found by its `point_id` tag. A child is complete once its `complete` tag is set, which happens last, after
its final metrics, its weights and its record were logged. The driver is the only writer.

Every write goes through one background thread, so a slow or unreachable tracking server never stalls Ray's
loop or training: the first failure is reported once, writes wait and retry until the server is back, and
whatever is still unlogged when the study ends is logged by the next invocation from the study's storage.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import queue
import re
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# The client's own retries (7, with backoff) would hold one write for minutes; our writer retries instead.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
# The console is the study's: no "View run ... at" pair per ended run (nor the extra read of the run it costs), and
# no progress bar per artifact a re-evaluation downloads (its weights).
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID  # noqa: E402

# A database store logs every failed write with its traceback (an ERROR of this logger) before raising it; the
# writer says what failed, once, in one line (`_Writer`).
logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)

from pipelines.config import UserError, first_line, flatten  # noqa: E402
from study.protocol import PointRecord  # noqa: E402
from study.storage import PointFiles, Storage  # noqa: E402

ROLE_TAG, POINT_TAG, COMPLETE_TAG, WEIGHTS_TAG, EVAL_TAG = "study_role", "point_id", "complete", "has_weights", "eval_"
RECORD_ARTIFACT = "record.json"  # a child run's `PointRecord`, as storage holds it
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")  # MLflow 3: a model-training experiment
VIEW_KEY = "study"  # the shared runs-table view, experiment tag `mlflow.sharedViewState.study`
NOTE_TAG, RUN_COLOUR = "mlflow.note.content", "mlflow.runColor"  # a run's description; its colour in the UI
_PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
_BATCH = 900  # MLflow's log_batch accepts at most 1000 entries
# Errors that retrying cannot fix (a changed param, a deleted run): reported and the write dropped.
_PERMANENT = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS", "BAD_REQUEST",
              "INVALID_STATE", "PERMISSION_DENIED"}


# The tracking URI schemes MLflow's client takes (`mlflow.tracking.registry`; a database's `+driver` aside), where
# its registry (which plugins add to) cannot be read.
SCHEMES = ("file", "sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks", "databricks-uc", "uc")
DATABASES = ("postgresql", "mysql", "mssql")


def check_tracking_uri(uri: str) -> None:
    """A tracking URI MLflow can open, checked before any work (its client would raise a traceback at the first
    read, or, for a database whose Python driver is missing, once the data were prepared): a scheme MLflow (or a
    plugin) takes, and a database's driver importable. Nothing is connected to.

    Raises:
        UserError: one line naming the scheme and the valid ones, or the driver missing.
    """
    from urllib.parse import urlparse

    from pipelines.config import UserError

    scheme = urlparse(uri).scheme.split("+")[0].lower()
    try:  # MLflow's own registry of store schemes: plugins add theirs there
        from mlflow.tracking._tracking_service.utils import _tracking_store_registry

        schemes = tuple(s for s in _tracking_store_registry._registry if s)
    except (ImportError, AttributeError):
        schemes = SCHEMES
    folder = scheme in ("", "file") or len(scheme) == 1  # a path (C:\\ on Windows): MLflow's file store
    if folder and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() not in ("1", "true"):
        raise UserError(f"--tracking-uri {uri}: a folder (file) store, which MLflow 3 opens only with "
                        f"MLFLOW_ALLOW_FILE_STORE=true; give sqlite:///PATH/mlflow.db (a local store: the default is "
                        f"OUT/mlflow.db) or http://HOST:PORT (a server)")
    if scheme and not folder and scheme not in schemes:
        raise UserError(f"--tracking-uri {uri}: MLflow takes no '{scheme}://' store; give one of "
                        f"{', '.join(s + '://' for s in schemes if s != 'file')}")
    if scheme in DATABASES:
        from sqlalchemy.engine import make_url

        try:
            make_url(uri).get_dialect().import_dbapi()
        except ImportError as err:
            raise _no_driver(uri, err) from None
        except Exception:  # noqa: BLE001  (a malformed URL: MLflow names it when it opens the store)
            pass


def open_client(uri: str) -> MlflowClient:
    """MLflow's client of `uri`; a store whose Python driver is missing is one line (`UserError`), not MLflow's
    traceback."""
    try:
        return MlflowClient(uri)
    except ImportError as err:  # a database store whose driver is not installed (e.g. postgresql: psycopg2)
        raise _no_driver(uri, err) from None


def _no_driver(uri: str, err: ImportError):
    from pipelines.config import UserError

    return UserError(f"--tracking-uri {uri}: MLflow cannot open it ({first_line(err)}); install the database's "
                     "Python driver")


def default_tracking_uri(root: Path) -> str:
    return f"sqlite:///{(root / 'mlflow.db').resolve()}"


def is_remote(tracking_uri: str) -> bool:
    return tracking_uri.startswith(("http://", "https://", "databricks"))


def ui_command(tracking_uri: str) -> str | None:
    """The command that serves a local store's UI (a server serves its own)."""
    return None if is_remote(tracking_uri) else f"mlflow ui --backend-store-uri {tracking_uri}"


def runs_url(tracking_uri: str, experiment_id: str) -> str:
    """The page that opens on the study's runs table in the shared view `VIEW_KEY`. MLflow 3 opens an experiment on
    its GenAI overview whatever the `mlflow.experimentKind` tag says; `workflowType=machine_learning` selects the
    runs table. A local store's UI is `mlflow ui` at its default address."""
    base = tracking_uri.rstrip("/") if is_remote(tracking_uri) else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning&viewStateShareKey={VIEW_KEY}"


def study_view(columns: list[str]) -> str:
    """The runs table's shared view (an experiment tag the UI reads as JSON): the headline metric `columns` and the
    point's tags shown, runs grouped by model (a group row shows the model's mean), every run charted (the default
    draws the 10 newest). The UI leaves a parent run collapsed whatever a view says, so the groups show the runs."""
    shown = [f"metrics.`{c}`" for c in columns] + [f"tags.`{t}`" for t in ("model", "subset_size", "seed")]
    return json.dumps({"selectedColumns": shown, "runsHiddenMode": "SHOW_ALL",
                       "groupBy": {"aggregateFunction": "average",
                                   "groupByKeys": [{"mode": "tag", "groupByData": "model"}]}})


def model_colours(models: list[str]) -> dict[str, str]:
    """A colour per model, in grid order (MLflow colours a run by its `mlflow.runColor` tag)."""
    return {m: _PALETTE[i % len(_PALETTE)] for i, m in enumerate(models)}


def point_tags(point, colour: str) -> dict[str, str]:
    """A child's tags: what the UI groups, filters and colours its runs by."""
    return {"model": point.model, "family": point.family, "subset_size": str(point.subset_size),
            "seed": str(point.seed), RUN_COLOUR: colour}


def rounded(value: float) -> float:
    """A metric as MLflow shows it: 4 significant digits (an accuracy in percent: 2 decimals from 10 to 99.99%);
    whole numbers (steps, examples_seen) exact. The results table keeps full precision."""
    return value if float(value).is_integer() else float(f"{value:.4g}")


def comparison_metrics(table) -> list[Metric]:
    """The study's comparison on its parent run: per model and accuracy measurement, the mean over seeds stepped by
    subset size, so the run's own charts draw each model's accuracy against the data size (Fig 3/4).

    Args:
        table: the tidy results table (`analysis.results`).
    """
    import pandas as pd

    from analysis.results import ACCURACY_METRICS
    from pipelines.downstream import Measurement

    rows = table[table["metric"].isin(ACCURACY_METRICS)]
    means = rows.groupby(["model", "eval", "dataset", "shots", "metric", "subset_size"], dropna=False)["value"].mean()
    now = int(time.time() * 1000)
    out = []
    for (model, ev, dataset, shots, metric, size), value in means.items():
        key = Measurement(ev, dataset, None if pd.isna(shots) else int(shots), metric, value).key
        out.append(Metric(f"{key}/{model.replace('/', '-')}", rounded(value), now, int(size)))
    return out


REPORT_NOT_LOGGED = "report_not_logged"  # the parent's: why the report's files are not among its artifacts
ENDED_TAGS = ("stop_reason", "failure_reason")  # why a point's run ended unfinished; removed when it finishes


@dataclass
class ChildRun:
    run_id: str
    status: str
    tags: dict[str, str]
    params: dict[str, str]

    @property
    def complete(self) -> bool:
        return self.tags.get(COMPLETE_TAG) == "1"

    @property
    def has_weights(self) -> bool:
        return self.tags.get(WEIGHTS_TAG) == "1"

    @property
    def eval_ids(self) -> dict[str, str]:
        return {k.removeprefix(EVAL_TAG): v for k, v in self.tags.items() if k.startswith(EVAL_TAG)}


class _Writer(threading.Thread):
    """Runs queued MLflow writes in order; retries a write until the server takes it or the study ends."""

    def __init__(self, uri: str):
        super().__init__(daemon=True, name="mlflow-writer")
        self.uri, self.jobs, self.down_since = uri, queue.Queue(), None
        self.answered = False  # some write of this invocation reached the store
        self.stopping = threading.Event()
        self.dropped = threading.Event()  # the study is another driver's now: queued writes are dropped
        self.full: str | None = None  # the local store's disk is full: writes from then on are counted, not tried
        self.failing = False  # the server answered the last write with an error of its own (`_failing`)
        self.lost = 0
        self.start()

    def submit(self, what: str, job: Callable[[], None], given_up: Callable[[str], None] | None = None) -> None:
        """Queue `job`; `given_up(why)` is called (on this thread) if the writer gives it up (`FAILING_TRIES`), `why`
        naming the server's answer."""
        self.jobs.put((what, job, given_up))

    def run(self) -> None:
        while True:
            what, job, given_up = self.jobs.get()
            if self.full is not None:
                self.lost += 1
            elif not self.dropped.is_set():
                self._until_done(what, job, given_up)
            self.jobs.task_done()

    def _until_done(self, what: str, job: Callable[[], None], given_up: Callable[[str], None] | None) -> None:
        wait, failed, reset = 1.0, 0, False
        while True:
            try:
                job()
            except Exception as err:  # noqa: BLE001  (a network or database error: wait and retry)
                if self.failing and not reset and connection_reset(err):
                    reset = True  # the connection a failed upload left (the server answered without reading it)
                    continue
                if disk_full(err):  # no wait brings the space back: say so once, and try nothing more
                    self.full, self.lost = first_line(err), self.lost + 1
                    print(f"mlflow: the disk under {self.uri} is full ({self.full}); this invocation logs nothing "
                          "more there, and its runs may show RUNNING: free space and rerun the same command, which "
                          "logs what is missing from the study's storage", file=sys.stderr)
                    return
                if isinstance(err, MlflowException) and err.error_code in _PERMANENT:
                    print(f"mlflow: {what} not logged: {first_line(err)}", file=sys.stderr)
                    return
                if (status := server_error(err)) is not None:  # it answers: a wait rarely mends its own store
                    failed += 1
                    if self._failing(what, status, failed):
                        self.lost += 1
                        if given_up is not None:
                            given_up(f"HTTP {status} from {self.uri}, {failed} tries")
                        return
                else:
                    self._down(err)
            else:
                self.answered = True
                if self.down_since is not None:
                    print(f"mlflow: {self.uri} is reachable again after {time.time() - self.down_since:.0f} s; "
                          f"logging the {self.jobs.qsize() + 1} queued writes", file=sys.stderr)
                    self.down_since = None
                self.failing = False
                return
            if self.stopping.is_set() or self.dropped.is_set():
                return
            time.sleep(wait)
            wait = min(2 * wait, 10.0)

    def _failing(self, what: str, status: int, tries: int) -> bool:
        """A write the server answered with an error of its own (its artifact store or database failing, not an
        outage): said once until a write succeeds again; given up after `FAILING_TRIES`, so the writes behind it (the
        other points', the runs' ends) still get through. Returns whether to give it up."""
        if not self.failing:
            self.failing = True
            print(f"mlflow: {self.uri} answers {what} with HTTP {status}: the server runs, but its own store failed "
                  "(check its artifact store and database); each write is tried "
                  f"{FAILING_TRIES} times, and what fails is left to the next invocation, which logs it from the "
                  "study's storage", file=sys.stderr)
        return tries >= FAILING_TRIES

    def _down(self, err: Exception) -> None:
        if self.down_since is None:
            self.down_since = time.time()
            print(f"mlflow: {self.uri} is unreachable ({unreachable_why(err)}); training goes on, results are kept "
                  "in the study's storage and logged when the server is back (a wrong address: stop with Ctrl-C and "
                  "fix --tracking-uri)", file=sys.stderr)

    def drain(self, timeout: float, unanswered: float = 10.0) -> int:
        """Wait up to `timeout` s for the queue to empty (`unanswered` s where the store has not taken one write of
        this invocation: a wrong address or a server down since the start, which two more minutes rarely bring
        back); returns the number of writes left."""
        if self.jobs.unfinished_tasks and self.down_since is not None and not self.answered:
            timeout = min(timeout, unanswered)
            print(f"mlflow: {self.uri} has not answered once in this invocation; its {self.jobs.unfinished_tasks} "
                  "queued writes are left to the next invocation, which logs them from the study's storage",
                  file=sys.stderr)
        elif self.jobs.unfinished_tasks and self.down_since is not None:  # a wait of minutes: say what it is
            print(f"mlflow: {self.uri} is still unreachable; waiting up to {timeout:.0f} s for its "
                  f"{self.jobs.unfinished_tasks} queued writes (what is left then, the next invocation logs from "
                  "the study's storage)", file=sys.stderr)
        deadline = time.time() + timeout
        while self.jobs.unfinished_tasks and time.time() < deadline:
            time.sleep(0.2)
        self.stopping.set()
        return self.jobs.unfinished_tasks + self.lost


FAILING_TRIES = 4  # tries of a write the server answers with an error of its own (1 + 2 + 4 s between them)
# The HTTP status of a response MLflow's client raised for (its own retries off: urllib3's "too many 500 error
# responses"; an error body it could not parse: "error code 500 != 200")
_STATUS = re.compile(r"too many (\d{3}) error responses|error code (\d{3}) != 200|(\d{3}) Server Error")


def server_error(err: BaseException) -> int | None:
    """The HTTP status where the tracking server answered a write with an error of its own (5xx); None where it did
    not answer, or answered as a gateway or a busy server does (429, 502-504: the server is not there, or not yet),
    which a wait can mend. From the response where the error carries one (requests' HTTPError), its message
    (MLflow's client quotes urllib3's or requests' words), or, for an error body MLflow parsed (`RestException`:
    the server's own INTERNAL_ERROR, whose status it drops), 500."""
    from mlflow.exceptions import RestException

    status = getattr(getattr(err, "response", None), "status_code", None)
    if not isinstance(status, int):
        found = _STATUS.search(str(err))
        status = int(next(g for g in found.groups() if g)) if found else None
    if status is None and isinstance(err, RestException) and err.error_code == "INTERNAL_ERROR":
        status = 500
    return status if status is not None and status >= 500 and status not in (502, 503, 504) else None


def connection_reset(err: BaseException) -> bool:
    """A request cut on a connection the server had closed (as it does after answering an upload with an error,
    unread): one retry at once, on a new connection, is no outage."""
    return "Connection aborted" in str(err) or "ConnectionResetError" in str(err)


def disk_full(err: BaseException) -> bool:
    """A write that failed for want of space on a local store (SQLite's "database or disk is full", or ENOSPC from
    a file store or an artifact copy): not an outage, which a wait can end."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if getattr(err, "errno", None) == errno.ENOSPC or "database or disk is full" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


def pretrain_metrics(record: PointRecord) -> dict[str, float]:
    """The pretraining summary under MLflow names (`examples_seen` and `pretrain_flops` plain: plot axes)."""
    plain = {"examples_seen", "resumed_from_step"}
    out = {(k if k in plain else f"pretrain/{k}"): v for k, v in record.pretrain.to_dict().items()}
    return {**out, "pretrain_flops": record.fields.pretrain_flops}


def headline_name(evaluation: str, shots: int | None) -> str:
    """The short name of the headline task's top-1 under `evaluation` (a column of the runs table)."""
    return "finetune_top1" if evaluation == "finetune" else f"fewshot_{shots}shot_top1"


def eval_metrics(record: PointRecord, ran: tuple[str, ...] | None, headline_task: str) -> dict[str, float]:
    """Measurements of the evaluations that ran, by name; the headline task's top-1 also under short names."""
    out = {}
    for kind, ev in record.evals.items():
        if ran is not None and kind not in ran:
            continue
        for m in ev.measurements:
            out[m.key] = m.value
            if m.spread is not None:
                out[m.key + "_std"] = m.spread
            if m.dataset == headline_task and m.metric == "top1" and m.eval in ("fewshot", "finetune"):
                out[headline_name(m.eval, m.shots)] = m.value
    return out


_UNREACHABLE = (("Connection refused", "connection refused: nothing listens there"),
                ("Name or service not known", "no such host"), ("Temporary failure in name resolution", "no such host"),
                ("nodename nor servname", "no such host"), ("timed out", "timed out"),
                ("No route to host", "no route to host"), ("Network is unreachable", "network unreachable"))


def unreachable_why(err: Exception) -> str:
    """Why a server did not answer, in a few words where the error names a socket's failure (MLflow wraps it in a
    message that quotes urllib3's repr), else the error's first line."""
    text = str(err)
    return next((why for cause, why in _UNREACHABLE if cause in text), first_line(err))


class Tracker:
    """The study's parent run and its children. Reads (at start) are synchronous; writes are queued."""

    def __init__(self, tracking_uri: str, experiment: str, artifact_root: Path, fresh: bool = False,
                 read_only: bool = False):
        self.uri, self.name, self.fresh = tracking_uri, experiment, fresh
        self.client = open_client(tracking_uri)
        self.experiment_id, self.parent_id = "", ""
        self.parent_status, self.parent_tags = "", {}  # the parent found at start, as it was then
        self.runs: dict[str, str] = {}  # point id -> child run id
        self.started: set[str] = set()  # points whose child this invocation marked RUNNING (writer thread)
        self.unlogged: dict[str, str] = {}  # points whose final logging the writer gave up: why (writer thread)
        self.begun: set[str] = set()  # points whose trial said it started, in this invocation (as it is told)
        self.ended: set[str] = set()  # ... and those it ended since (FINISHED, FAILED, KILLED)
        self.params: dict[str, dict[str, str]] = {}  # run id -> params already logged (params are immutable)
        self.steps: dict[tuple[str, str], set[int]] = {}  # (run id, key) -> every step it holds (`log_history`)
        self.newest: dict[tuple[str, str], tuple[int, float]] = {}  # (run id, key) -> its newest step, the value there
        self.known: dict[str, ChildRun] = {}
        self.colours: dict[str, str] = {}  # model -> its runs' colour (`show`)
        self.writer = None if read_only else _Writer(tracking_uri)
        self.unseen = False  # the store did not answer when opened: `known` is empty for want of an answer
        try:
            self._open(artifact_root, read_only)
        except Exception as err:  # noqa: BLE001  (an outage at start: plan from storage, log later)
            self.unseen = True
            if self.writer is None:
                print(f"mlflow: {tracking_uri} is unreachable ({unreachable_why(err)}); planning from storage alone",
                      file=sys.stderr)
                return
            self.writer._down(err)
            self.writer.submit("experiment", lambda: self._open(artifact_root, False))

    def _open(self, artifact_root: Path, read_only: bool) -> None:
        found = self.client.get_experiment_by_name(self.name)
        if found is None and read_only:
            return
        if found is None:  # a server decides where artifacts go (proxied); a local store keeps them beside it
            location = None if is_remote(self.uri) else artifact_root.resolve().as_uri()
            self.experiment_id = self.client.create_experiment(self.name, artifact_location=location)
        else:
            self.experiment_id = found.experiment_id
        if not read_only:
            self.client.set_experiment_tag(self.experiment_id, *EXPERIMENT_KIND)
        if not self.fresh and not self.parent_id:
            parents = self.client.search_runs([self.experiment_id], f"tags.{ROLE_TAG} = 'parent'",
                                              order_by=["attributes.start_time DESC"], max_results=1)
            if parents:
                self.parent_id = parents[0].info.run_id
                self.parent_status, self.parent_tags = parents[0].info.status, dict(parents[0].data.tags)
                self.known = self._children()

    def _children(self) -> dict[str, ChildRun]:
        runs = self.client.search_runs([self.experiment_id], f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{self.parent_id}'",
                                       max_results=50_000)
        out: dict[str, ChildRun] = {}
        for run in sorted(runs, key=lambda r: r.info.start_time):
            point = run.data.tags.get(POINT_TAG)
            if point and (point not in out or not out[point].complete):
                out[point] = ChildRun(run.info.run_id, run.info.status, dict(run.data.tags), dict(run.data.params))
        return out

    # Writes (queued).

    def start_parent(self, run_name: str, tags: dict, files: list[Path], invocation: str) -> None:
        """Create or reopen the study's parent run. Its config changes from one invocation to the next (params
        are immutable), so each invocation's files go under `invocations/<invocation>/`."""
        def job() -> None:
            if not self.parent_id:
                run = self.client.create_run(self.experiment_id, run_name=run_name,
                                             tags={ROLE_TAG: "parent", **tags})
                self.parent_id = run.info.run_id
            else:
                self.client.update_run(self.parent_id, status="RUNNING")
                self.client.log_batch(self.parent_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
            for f in files:
                self.client.log_artifact(self.parent_id, str(f), f"invocations/{invocation}")
        self.writer.submit("the study's parent run", job)

    def show(self, models: list[str], columns: list[str]) -> None:
        """Colour each model's runs and set the experiment's shared runs-table view (`runs_url` opens it) with the
        headline metric `columns`."""
        self.colours = model_colours(models)
        self.writer.submit("the runs-table view", lambda: self.client.set_experiment_tag(
            self.experiment_id, f"mlflow.sharedViewState.{VIEW_KEY}", study_view(columns)))

    def start_point(self, point, params: dict, metrics: dict, tags: dict) -> None:
        """Create (or take over) the point's child run and log params; marks it RUNNING, and no longer `complete`
        where it was (a re-evaluation cut off by a killed driver then ends KILLED, not FINISHED)."""
        def job() -> None:
            run_id = self._child(point, tags)
            self.client.update_run(run_id, status="RUNNING")
            if (known := self.known.get(point.id)) is not None and known.complete:
                self.client.set_tag(run_id, COMPLETE_TAG, "0")
            self.started.add(point.id)
            self._log_params(run_id, params)
            self._log_metrics(run_id, metrics, step=0)
        self.begun.add(point.id)
        self.writer.submit(f"start of {point.name}", job)

    def log_curve(self, point, prefix: str, step: int, values: dict) -> None:
        """Per-epoch metrics at the stage's global step; a (key, step) already logged is not logged again."""
        def job() -> None:
            run_id = self._child(point, {})
            fresh = {f"{prefix}/{k}": v for k, v in values.items()
                     if step > self._last_step(run_id, f"{prefix}/{k}")}
            self._log_metrics(run_id, fresh, step)
        self.writer.submit(f"{prefix} curve of {point.name}", job)

    def log_history(self, point, curves: dict[str, dict[str, dict]], tags: dict) -> None:
        """A point's stored curves ({prefix: {step: values}}, `study.trial.CurveLog`), the (key, step) entries its
        run lacks: what the live writes of an earlier invocation did not log (a tracking outage, a killed driver),
        also below the steps this invocation logged live (a resumed point's first part)."""
        def job() -> None:
            run_id = self._child(point, tags)
            now = int(time.time() * 1000)
            self._log_entries(run_id, [Metric(f"{prefix}/{k}", rounded(float(v)), now, int(step))
                                       for prefix, steps in curves.items() if isinstance(steps, dict)
                                       for step, values in steps.items()
                                       if str(step).lstrip("-").isdigit() and isinstance(values, dict)
                                       for k, v in values.items() if isinstance(v, int | float) and math.isfinite(v)
                                       and int(step) not in self.steps.get((run_id, f"{prefix}/{k}"), ())])
        if curves:
            self.writer.submit(f"stored curves of {point.name}", job)

    def logged_evals(self, point) -> dict[str, str]:
        """{evaluation: its id} whose final metrics the point's child run held when the study was planned (the
        tags `finish_point` sets after logging them): an earlier invocation stopped mid-point logged none."""
        known = self.known.get(point.id)
        if known is None:
            return {}
        return {k[len(EVAL_TAG):]: v for k, v in known.tags.items() if k.startswith(EVAL_TAG)}

    def finish_point(self, point, record: PointRecord, storage: Storage, ran: tuple[str, ...] | None,
                     extra: list[Path], tags: dict, headline_task: str, params: dict) -> None:
        """The evaluation recipe (`params`), final metrics of the evaluations that `ran` (all: None), the pretraining
        summary once, the weights and files from storage, the evaluation ids, then `complete` and FINISHED."""
        def job() -> None:
            run_id = self._child(point, tags)
            self._log_params(run_id, params)
            # Logged once: a re-evaluation adds no pretraining entries (its step is already there).
            self._log_metrics(run_id, pretrain_metrics(record), step=point.steps)
            self._log_metrics(run_id, eval_metrics(record, ran, headline_task), step=point.steps, dedupe=False)
            with tempfile.TemporaryDirectory() as tmp:
                self._log_stored(run_id, storage, point.id, Path(tmp), record)
            for f in extra:
                self.client.log_artifact(run_id, str(f))
            self.client.log_batch(run_id, tags=[RunTag(f"{EVAL_TAG}{k}", v.id) for k, v in record.evals.items()]
                                  + [RunTag(WEIGHTS_TAG, "1")])
            self.client.set_tag(run_id, COMPLETE_TAG, "1")
            known = self.known.get(point.id)
            for name in ENDED_TAGS:  # an earlier invocation's stop or failure of this point, no longer true
                if known is not None and known.run_id == run_id and name in known.tags:
                    self.client.delete_tag(run_id, name)
            self.client.set_terminated(run_id, "FINISHED")
            self.ended.add(point.id)
        def given_up(why: str) -> None:  # its run ends FAILED with why (`end_started`), not RUNNING
            self.unlogged[point.id] = (f"its final logging failed at the tracking server ({why}); the next "
                                       "invocation logs it from the study's storage")
            if point.id in self.runs:
                self.started.add(point.id)
        self.writer.submit(f"results of {point.name}", job, given_up)

    def fail_point(self, point, reason: str, tags: dict) -> None:
        def job() -> None:
            run_id = self._child(point, tags)
            self.client.set_tag(run_id, "failure_reason", reason[:5000])
            self.client.set_terminated(run_id, "FAILED")
            self.ended.add(point.id)
        self.writer.submit(f"failure of {point.name}", job)

    def close_orphans(self, running_now: set[str]) -> None:
        """Children left RUNNING by a killed driver whose points do not run now are marked KILLED, or FINISHED where
        the driver had logged all of it (`complete`) and died before its last write, the status."""
        for point, child in self.known.items():
            if child.status == "RUNNING" and point not in running_now:
                status = "FINISHED" if child.complete else "KILLED"
                self.writer.submit(f"orphan {child.run_id}", lambda run_id=child.run_id, status=status:
                                   self.client.set_terminated(run_id, status))

    def note_stop(self, point, reason: str) -> None:
        """Why a started point's run ends KILLED (`kill_points` ends it): a tag, on the run the point started."""
        def job() -> None:
            if (run_id := self.runs.get(point.id)) is not None:
                self.client.set_tag(run_id, "stop_reason", reason[:5000])
        self.writer.submit(f"stop of {point.name}", job)

    def kill_points(self, points) -> None:
        """The children of `points` (stopped by a signal) end KILLED, whatever a trial reported on its way out;
        a point that never started has no child and gets none."""
        def job(point) -> None:
            known = self.known.get(point.id)
            run_id = self.runs.get(point.id) or (known.run_id if known is not None else None)
            if run_id is not None:
                self.client.set_terminated(run_id, "KILLED")
                self.ended.add(point.id)

        for point in points:
            self.writer.submit(f"stop of {point.name}", lambda point=point: job(point))

    def end_started(self, status: str, reason: str | None = None) -> None:
        """The children this invocation marked RUNNING and has not ended end `status` (tagged `failure_reason` where
        a `reason` is given): the driver was stopped at once (a second signal, or one while no trial runs), lost its
        Ray cluster or failed while trials ran, so no trial's own end reached MLflow. Children an earlier, killed
        driver left RUNNING end KILLED (FINISHED where complete)."""
        def job() -> None:
            for point_id in sorted(self.started - self.ended):
                if (why := reason or self.unlogged.get(point_id)) is not None:
                    self.client.set_tag(self.runs[point_id], "failure_reason", why[:5000])
                self.client.set_terminated(self.runs[point_id], status)
                self.ended.add(point_id)
            # Children a killed driver left RUNNING whose points this invocation was to run but never started (it
            # stopped first): not this invocation's to fail; ended as `close_orphans` ends the others.
            for point_id, child in sorted(self.known.items()):
                if child.status == "RUNNING" and point_id not in self.started | self.ended:
                    self.client.set_terminated(child.run_id, "FINISHED" if child.complete else "KILLED")
                    self.ended.add(point_id)

        self.writer.submit("the points left running", job)

    def finish_parent(self, status: str, files: list[Path], folder: Path | None, tags: dict | None = None,
                      description: str = "", metrics: list[Metric] | None = None) -> None:
        """The study's comparison (`comparison_metrics`), its `description` (MLflow shows it atop the run), the report
        `files` and figure `folder` as artifacts, then `status`; a tag given as None is removed where set. Where the
        server fails these writes (its artifact store, `_Writer._failing`), the parent still ends `status`, tagged
        `report_not_logged` with why, which the next invocation that logs the report removes."""
        tags = {**(tags or {}), **({REPORT_NOT_LOGGED: None} if files or folder is not None else {})}

        def job() -> None:
            gone = [name for name, value in tags.items() if value is None]
            tagged = self.client.get_run(self.parent_id).data.tags if gone else {}
            for name, value in {**tags, **({NOTE_TAG: description} if description else {})}.items():
                if value is not None:
                    self.client.set_tag(self.parent_id, name, value)
                elif name in tagged:  # None: no longer true (an earlier invocation's failures, since resumed)
                    self.client.delete_tag(self.parent_id, name)
            self._log_comparison(metrics or [])
            for f in files:
                self.client.log_artifact(self.parent_id, str(f))
            if folder is not None and folder.is_dir():
                self.client.log_artifacts(self.parent_id, str(folder), folder.name)
            self.client.set_terminated(self.parent_id, status)

        def given_up(why: str) -> None:  # the status at least, which the tracking store (not its artifacts) takes:
            def end() -> None:  # queued as every write is (its retries, a reset connection's included)
                self.client.set_tag(self.parent_id, REPORT_NOT_LOGGED, f"the tracking server failed its files "
                                    f"({why}); the next invocation that writes the report logs them")
                self.client.set_terminated(self.parent_id, status)
            self.writer.submit("the study's end", end)
        self.writer.submit("the study's report", job, given_up)

    def close(self, timeout: float = 120.0) -> int:
        """Wait for queued writes (at most `timeout` s); returns how many could not be logged."""
        return self.writer.drain(timeout)

    def abandon(self) -> None:
        """Write nothing more (queued writes included, and one being retried): another driver took the study, and
        its runs are its own."""
        if self.writer is not None:
            self.writer.dropped.set()
            self.writer.stopping.set()

    # Reads for a later invocation.

    def fetch_record(self, child: ChildRun) -> PointRecord | None:
        """The record a finished point logged; None where its run has none (logged by an older version)."""
        with tempfile.TemporaryDirectory() as tmp:
            path = self._artifact(child, RECORD_ARTIFACT, tmp)
            return PointRecord.from_json(path.read_text()) if path is not None else None

    def fetch_weights(self, child: ChildRun, storage: Storage, files: PointFiles) -> bool:
        """Copy a finished point's logged weights (and record) into storage, for re-evaluation elsewhere; False
        where its run holds none."""
        with tempfile.TemporaryDirectory() as tmp:
            folder, record = self._artifact(child, "model", tmp), self._artifact(child, RECORD_ARTIFACT, tmp)
            if folder is None or record is None:
                return False
            for f in folder.iterdir():
                storage.upload_file(f, files.file(f.name))
            storage.upload_file(record, files.record)
        return True

    def _artifact(self, child: ChildRun, name: str, tmp: str) -> Path | None:
        """A top-level artifact of `child` downloaded into `tmp`; None where the run has none. A store that does
        not answer raises UserError: taken for "none", it made a finished point train again, silently."""
        try:
            if name not in {Path(a.path).name for a in self.client.list_artifacts(child.run_id)}:
                return None
            return Path(self.client.download_artifacts(child.run_id, name, tmp))
        except Exception as err:  # noqa: BLE001  (MlflowException, requests' and boto's errors, OSError, ...)
            raise UserError(f"MLflow's artifact store did not give {name} of run {child.run_id}: {first_line(err)}; "
                            "rerun when it answers (the point is not trained again meanwhile)") from None

    # Helpers (writer thread only).

    def _child(self, point, tags: dict) -> str:
        if point.id in self.runs:
            return self.runs[point.id]
        if (known := self.known.get(point.id)) is not None:
            self.runs[point.id] = known.run_id
            self.params[known.run_id] = dict(known.params)
            self._load_steps(known.run_id)
            return known.run_id
        found = self.client.search_runs([self.experiment_id], f"tags.{POINT_TAG} = '{point.id}' and "
                                        f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{self.parent_id}'", max_results=1)
        if found:
            run_id = found[0].info.run_id
            self.params[run_id] = dict(found[0].data.params)
        else:
            colour = self.colours.get(point.model, _PALETTE[0])
            run = self.client.create_run(self.experiment_id, run_name=f"{point.model} n={point.subset_size} "
                                         f"seed={point.seed}", tags={MLFLOW_PARENT_RUN_ID: self.parent_id,
                                                                     ROLE_TAG: "point", POINT_TAG: point.id,
                                                                     **point_tags(point, colour), **tags})
            run_id = run.info.run_id
        self.runs[point.id] = run_id
        self._load_steps(run_id)
        return run_id

    def _load_steps(self, run_id: str) -> None:
        """The steps of every metric a taken-over run already has, and the value last logged at its newest step, so
        nothing is logged twice."""
        for key in self.client.get_run(run_id).data.metrics:
            history = self.client.get_metric_history(run_id, key)
            newest = max(history, key=lambda m: (m.step, m.timestamp))
            self.steps[(run_id, key)] = {m.step for m in history}
            self.newest[(run_id, key)] = (newest.step, newest.value)

    def _log_params(self, run_id: str, params: dict) -> None:
        """Params not yet on the run. MLflow params are immutable: a value that changed since the run logged it
        (an execution setting such as the device or world_size of a resumed point) goes to a `latest.<key>` tag."""
        if run_id not in self.params:
            self.params[run_id] = dict(self.client.get_run(run_id).data.params)
        done = self.params[run_id]
        values = {k: str(v)[:6000] for k, v in flatten(params).items()}
        plist = [Param(k, v) for k, v in values.items() if k not in done]
        changed = [RunTag(f"latest.{k}", v) for k, v in values.items() if k in done and done[k] != v]
        for i in range(0, len(plist), _BATCH):
            self.client.log_batch(run_id, params=plist[i:i + _BATCH])
        if changed:
            self.client.log_batch(run_id, tags=changed)
        done.update((p.key, p.value) for p in plist)

    def _log_metrics(self, run_id: str, metrics: dict, step: int, dedupe: bool = True) -> None:
        """The entries at `step` the run lacks: with `dedupe`, those of keys not yet logged at or past it; without
        (final evaluation metrics, which a re-evaluation logs again at the same step), those whose value differs
        from the one last logged there (a retried write, or the rerun of a driver killed before it tagged the
        point complete, adds none)."""
        now = int(time.time() * 1000)
        entries = [Metric(k, rounded(float(v)), now, step) for k, v in metrics.items()
                   if isinstance(v, int | float) and math.isfinite(v)]
        self._log_entries(run_id, [m for m in entries if (step > self._last_step(run_id, m.key) if dedupe
                                                          else self.newest.get((run_id, m.key)) != (step, m.value))])

    def _last_step(self, run_id: str, key: str) -> int:
        """The newest step `key` holds on the run (-1: none)."""
        return self.newest.get((run_id, key), (-1, 0.0))[0]

    def _log_entries(self, run_id: str, entries: list[Metric]) -> None:
        """Metric entries in batches MLflow takes, then each key's newest step and value there noted (`newest`)."""
        for i in range(0, len(entries), _BATCH):
            self.client.log_batch(run_id, metrics=entries[i:i + _BATCH])
        for m in entries:
            if m.step >= self._last_step(run_id, m.key):
                self.newest[(run_id, m.key)] = (m.step, m.value)
            self.steps.setdefault((run_id, m.key), set()).add(m.step)

    def _log_comparison(self, metrics: list[Metric]) -> None:
        """The entries the parent lacks: a later invocation logs a (key, step) again only if its value changed (more
        seeds); MLflow keeps every entry, so a changed one shows as a second point at that step."""
        have = {(m.key, m.step, m.value) for key in {m.key for m in metrics}
                for m in self.client.get_metric_history(self.parent_id, key)}
        fresh = [m for m in metrics if (m.key, m.step, m.value) not in have]
        for i in range(0, len(fresh), _BATCH):
            self.client.log_batch(self.parent_id, metrics=fresh[i:i + _BATCH])

    def _log_stored(self, run_id: str, storage: Storage, point_id: str, tmp: Path, record: PointRecord) -> None:
        (tmp / RECORD_ARTIFACT).write_text(record.to_json())
        self.client.log_artifact(run_id, str(tmp / RECORD_ARTIFACT))
        for rel, artifact_path in PointFiles(point_id).logged():
            local = tmp / rel.rsplit("/", 1)[1]
            if storage.download_file(rel, local):
                self.client.log_artifact(run_id, str(local), artifact_path)


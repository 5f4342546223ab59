"""A real `mlflow server` on 127.0.0.1 (proxied artifacts): runs and artifacts land on the server, none on the
driver's disk, and an outage mid-study, long enough for the driver to notice it and for a point to finish, loses no
row of the results table; the URL the study prints opens its runs table in headless Chromium."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import checkpointed, run_cli, start_cli, wait_until

pytestmark = pytest.mark.slow


class Server:
    def __init__(self, root):
        self.root = root
        self.artifacts = root / "server-artifacts"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self) -> None:
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
               "--artifacts-destination", str(self.artifacts), "--workers", "1"]
        # The server's job runner (MLflow 3's server-side jobs; the study submits none) is a second process that
        # imports MLflow while the server starts: without it, a start takes about half as long on 2 cores.
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True, env=env)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("mlflow server did not start")

    def stop(self) -> None:
        os.killpg(self.proc.pid, 9)
        self.proc.wait()


def browser_dom(url: str) -> str:
    """The page's DOM once headless Chromium has run its scripts (the UI is a single-page app)."""
    proc = subprocess.run([shutil.which("chromium"), "--headless", "--no-sandbox", "--disable-gpu",
                           "--window-size=1400,900", "--virtual-time-budget=20000", "--dump-dom", url],
                          capture_output=True, text=True, timeout=180)
    return proc.stdout


def _finished(out) -> bool:
    """A point has run all its evaluations (its record is complete in storage)."""
    return any(len(json.loads(r.read_text())["evals"]) == 4
               for r in out.glob("smoke/storage/points/*/record.json"))


@pytest.fixture
def server(tmp_path):
    srv = Server(tmp_path)
    srv.start()
    yield srv
    srv.stop()


def test_runs_and_artifacts_go_to_the_server_and_an_outage_loses_nothing(server, tmp_path, cache_dir):
    out = tmp_path / "runs"
    args = ["-m", "study.run", "--grid", "configs/smoke.yaml", "--out", str(out), "--tracking-uri", server.uri,
            "models=[ViT-Pico/4]", "pretrain.steps=30", "pretrain.checkpoint_every=10",
            "resources.max_concurrent_trials=1", "evaluate.finetune.lr=0.01"]
    proc = start_cli(args, cache_dir, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "stderr.txt", "w"))
    wait_until(proc, lambda: checkpointed(out), "a checkpoint in storage")
    server.stop()  # mid-study: the first point is training
    # The server stays down until the driver has failed a write and a point has finished: its per-epoch metrics,
    # final metrics, record and weights were all queued while nothing answered (no fixed sleep to wait out).
    wait_until(proc, lambda: "is unreachable" in (tmp_path / "stderr.txt").read_text() and _finished(out),
               "a failed write and a finished point during the outage")
    server.start()
    assert proc.wait(timeout=600) == 0, (tmp_path / "stderr.txt").read_text()[-3000:]
    stderr = (tmp_path / "stderr.txt").read_text()
    assert "is reachable again" in stderr  # the queued writes went to the server of this invocation
    assert stderr.count("is unreachable") == 1  # said once, not per write
    table = pd.read_csv(out / "smoke" / "results.csv")  # complete whatever MLflow had
    assert sorted(table["subset_size"].unique()) == [256, 1024]
    assert len(table[~table["eval"].isin(["diagnostics", "upstream"])]) == 2 * (2 + 3 + 3)
    again = run_cli(args, cache_dir)  # logs from storage whatever the outage kept from MLflow
    assert again.returncode == 0, again.stderr[-3000:]
    assert "View run" not in stderr + again.stdout + again.stderr  # MLflow's own line per ended run: not printed
    client = MlflowClient(server.uri)
    exp = client.get_experiment_by_name("smoke")
    assert exp.tags.get("mlflow.experimentKind") == "custom_model_development"
    assert exp.artifact_location.startswith("mlflow-artifacts:")
    runs = client.search_runs([exp.experiment_id])
    children = [r for r in runs if r.data.tags.get("study_role") == "point"]
    assert len(children) == 2 and {c.info.status for c in children} == {"FINISHED"}
    assert sum(r.data.tags.get("study_role") == "parent" for r in runs) == 1
    for child in children:
        assert "fewshot/shapes-novel/5shot_top1" in child.data.metrics
        assert {a.path for a in client.list_artifacts(child.info.run_id, "model")} == {
            "model/pretrained.safetensors", "model/model.json"}
    assert list((tmp_path / "server-artifacts").rglob("pretrained.safetensors"))  # on the server's side
    assert not (out / "mlartifacts").exists() and not (out / "mlflow.db").exists()  # nothing on the driver's disk
    url = re.search(r"^runs: +(\S+)$", again.stdout, re.M).group(1)
    assert url.startswith(f"{server.uri}/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning")
    if shutil.which("chromium") is None:
        pytest.skip("chromium is not installed: the printed URL was not opened in a browser")
    # The table's rows in order: the model's group (its colour and mean), then its two runs nested under it.
    rows = re.findall(r">Group: ([^<]+)<|>([^<>]+) n=\d+ seed=\d+<", browser_dom(url))
    assert rows == [("ViT-Pico/4", ""), ("", "ViT-Pico/4"), ("", "ViT-Pico/4")], rows


def test_a_server_whose_artifact_store_fails_ends_the_runs_and_lets_later_writes_through(server, tmp_path, capsys):
    """The server answers, but its artifact store fails every upload (HTTP 500): said as that, not as an outage; a
    point's final logging is given up after a few tries, so the writes queued behind it (another point's curve, the
    runs' ends) still get through. Its run ends FAILED saying why, the parent its status with why its report is
    missing, and nothing stays RUNNING. A next invocation, the store mended, logs both."""
    from argparse import Namespace

    from pipelines.downstream import Measurement
    from study.config import expand, load_study
    from study.identity import eval_ids
    from study.protocol import EvalRecord, PointFields, PointRecord, PretrainSummary, eval_kind
    from study.run import Locations
    from study.storage import Storage
    from study.tracking import REPORT_NOT_LOGGED, Tracker
    from tests.conftest import ROOT

    cfg = load_study(ROOT / "configs" / "smoke.yaml", ["evaluate.linear_probe=null", "evaluate.diagnostics=null"])
    (point, other, *_), evals = expand(cfg), eval_ids(cfg)
    where = Locations(cfg, Namespace(out=str(tmp_path / "runs"), storage=None, tracking_uri=server.uri))
    values = {"fewshot": Measurement("fewshot", "shapes-novel", 5, "top1", 31.25),
              "finetune": Measurement("finetune", "shapes-novel", None, "top1", 40.5)}
    record = PointRecord(point.id, PointFields(**point.table_fields), PretrainSummary(point.steps, point.examples_seen,
                         1.0, 0), {k: EvalRecord(i, [values[eval_kind(k)]]) for k, i in evals.items()})
    report = tmp_path / "report.md"
    report.write_text("# report")
    server.stop()
    server.artifacts = tmp_path / "a-file" / "artifacts"  # below a file: every upload fails on the server's side
    (tmp_path / "a-file").write_text("")
    server.start()

    def invocation() -> tuple[Tracker, int, float]:
        tracker = Tracker(where.tracking_uri, "smoke", tmp_path / "unused")
        tracker.start_parent("smoke", {}, [], "now")
        tracker.start_point(point, {}, {}, {})
        tracker.start_point(other, {}, {}, {})
        tracker.finish_point(point, record, Storage(str(tmp_path / "storage")), None, [report], {}, "shapes-novel",
                             {})
        tracker.log_curve(other, "pretrain/train", 1, {"loss": 2.5})  # queued behind the failing job
        tracker.end_started("FAILED")
        tracker.finish_parent("FINISHED", [report], None)
        start = time.monotonic()
        return tracker, tracker.close(timeout=120), time.monotonic() - start

    tracker, left, took = invocation()
    err = capsys.readouterr().err
    assert left == 2 and took < 60, (left, took)  # the point's results and the parent's report, given up
    assert err.count("answers results of ") == 1 and "with HTTP 500" in err and "unreachable" not in err, err
    client = tracker.client
    run = client.get_run(tracker.runs[point.id])
    assert run.info.status == "FAILED" and "HTTP 500" in run.data.tags["failure_reason"]
    assert "complete" not in run.data.tags and run.data.metrics["finetune/shapes-novel/top1"] == 40.5
    assert client.get_run(tracker.runs[other.id]).data.metrics["pretrain/train/loss"] == 2.5
    parent = client.get_run(tracker.parent_id)
    assert parent.info.status == "FINISHED" and "HTTP 500" in parent.data.tags[REPORT_NOT_LOGGED]
    assert "RUNNING" not in {r.info.status for r in client.search_runs([tracker.experiment_id])}

    server.stop()
    server.artifacts = tmp_path / "server-artifacts"
    server.start()
    stopped = Tracker(where.tracking_uri, "smoke", tmp_path / "unused")  # an invocation stopped before its report
    stopped.start_parent("smoke", {}, [], "stopped")
    stopped.finish_parent("KILLED", [], None)
    assert stopped.close(timeout=60) == 0
    assert REPORT_NOT_LOGGED in client.get_run(tracker.parent_id).data.tags  # it logged no report: still missing
    tracker, left, _ = invocation()
    assert left == 0
    run = client.get_run(tracker.runs[point.id])
    assert run.info.status == "FINISHED" and run.data.tags["complete"] == "1"
    assert len(client.get_metric_history(run.info.run_id, "finetune/shapes-novel/top1")) == 1  # logged once
    parent = client.get_run(tracker.parent_id)
    assert parent.info.status == "FINISHED" and REPORT_NOT_LOGGED not in parent.data.tags
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"report.md"}

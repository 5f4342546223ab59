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
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self) -> None:
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
               "--artifacts-destination", str(self.root / "server-artifacts"), "--workers", "1"]
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

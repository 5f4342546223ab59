"""Joining a Ray cluster with --address: a head started with `ray start --head` (token authentication on, as
Ray >= 2.59 starts it), and addresses or resource requests that can never work, refused before any work."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import ROOT, checkpointed, run_cli, start_cli, wait_until

RAY = shutil.which("ray", path=os.path.dirname(sys.executable)) or "ray"


@pytest.fixture(autouse=True, scope="module")
def private_ray_record():
    """The heads and clusters this module starts record their address (`ray_current_cluster`) under a temporary
    directory of their own (RAY_TMPDIR, which this process, `ray start` and the studies it runs all inherit), not in
    the machine's /tmp/ray: there every other study of the suite, running beside this module, would find a cluster
    and print its note ("a Ray cluster is running here ...") before the one line of an error it checks. Short, for
    the Unix sockets Ray puts under it."""
    before = os.environ.get("RAY_TMPDIR")
    private = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    os.environ["RAY_TMPDIR"] = private
    try:
        yield private
    finally:
        if before is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = before
        shutil.rmtree(private, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _refused(proc, tmp_path, message: str) -> None:
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and proc.stderr.strip().splitlines()[-1].startswith(f"error: {message}")
    assert not list(tmp_path.iterdir())  # no data, folder or MLflow run


def _refused_in_process(args: list[str], tmp_path, cache_dir, monkeypatch, capsys, message: str) -> None:
    """`main` as the command line calls it, in this process (a Python start per case would cost ~8 s of imports),
    for refusals made before any Ray starts; a real process's exit status and stderr: the tests below that start a
    head or a web server."""
    from study.run import main

    monkeypatch.setenv("VITSCALE_CACHE", str(cache_dir))
    monkeypatch.chdir(ROOT)
    code = main(["--grid", "configs/smoke.yaml", "--out", str(tmp_path), *args])
    _refused(subprocess.CompletedProcess(args, code, "", capsys.readouterr().err), tmp_path, message)


@pytest.mark.parametrize("address, message", [
    ("127.0.0.1:{port}", "--address 127.0.0.1:{port}: nothing answers at 127.0.0.1:{port}"),
    ("127.0.0.1", "--address '127.0.0.1' is not host:port or auto"),
    ("host:port", "--address 'host:port' is not host:port or auto"),
    ("ray://127.0.0.1:{port}", "--address ray://127.0.0.1:{port}: Ray Client (ray://) is not supported"),
])
def test_an_address_that_cannot_work_is_one_line_and_exit_2(address, message, tmp_path, cache_dir, monkeypatch,
                                                            capsys):
    port = _free_port()
    _refused_in_process(["--address", address.format(port=port)], tmp_path, cache_dir, monkeypatch, capsys,
                        message.format(port=port))


def test_auto_with_no_cluster_running(tmp_path, cache_dir, monkeypatch, capsys):
    """No `ray start` record and no RAY_ADDRESS: refused, even while other programs run private Rays here (the
    other tests' studies do), which Ray's own `auto` would join."""
    from study.tune_runner import cluster_here

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    if cluster_here():  # decided before the call: a failing call must fail the test, never skip it
        pytest.skip(f"a Ray cluster started by `ray start` is running on this machine ({cluster_here()})")
    _refused_in_process(["--address", "auto"], tmp_path, cache_dir, monkeypatch, capsys,
                        "--address auto: no Ray cluster is recorded on this machine (RAY_ADDRESS, or `ray start`'s "
                        "record in ")


def test_auto_names_a_head_started_with_another_temp_dir(tmp_path, cache_dir, monkeypatch, capsys):
    """`ray start --head --temp-dir DIR` records its address in DIR, where `auto` does not look (nor does Ray's):
    refused in one line that names the head's address to give instead."""
    from study.run import main
    from study.tune_runner import cluster_here

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    if cluster_here():
        pytest.skip(f"a Ray cluster started by `ray start` is running on this machine ({cluster_here()})")
    temp = Path(tempfile.mkdtemp(prefix="ray-temp-", dir="/tmp"))
    try:
        port = _start_head("disabled", cpus=0, temp_dir=temp).rpartition(":")[2]
        monkeypatch.setenv("VITSCALE_CACHE", str(cache_dir))
        monkeypatch.chdir(ROOT)
        code = main(["--grid", "configs/smoke.yaml", "--out", str(tmp_path), "--address", "auto"])
    finally:
        _stop_heads()
        shutil.rmtree(temp, ignore_errors=True)
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and line.startswith("error: --address auto: no Ray cluster is recorded on this machine")
    assert re.search(rf"heads started with another --temp-dir run here: .*:{port} \({temp}\).*: give --address "
                     rf"\S+:\d+$", line), line
    assert not list(tmp_path.iterdir())


def test_more_cpus_than_this_machine_has_is_refused_up_front(tmp_path, cache_dir, monkeypatch, capsys):
    _refused_in_process(["resources.cpus_per_worker=1000"], tmp_path, cache_dir, monkeypatch, capsys,
                        "resources.cpus_per_worker=1000: a trial's worker needs 1,000 CPUs on one node")


def test_more_workers_than_this_machine_can_place_is_refused_up_front(tmp_path, cache_dir, monkeypatch, capsys):
    _refused_in_process(["resources.workers_per_trial=32"], tmp_path, cache_dir, monkeypatch, capsys,
                        f"resources.workers_per_trial=32: this machine can place at most {os.cpu_count()} workers "
                        "of 1 CPU")


_HEADS: list[int] = []  # the sessions of the `ray start` commands this module ran (their daemons stay in them)


def _start_head(auth: str, cpus: int = 2, temp_dir: Path | None = None, *extra: str) -> str:
    port = _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": auth}
    temp = ["--temp-dir", str(temp_dir)] if temp_dir is not None else []
    proc = subprocess.Popen([RAY, "start", "--head", "--port", str(port), "--num-cpus", str(cpus),
                             "--include-dashboard=false", *temp, *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)
    _HEADS.append(proc.pid)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out.decode()[-2000:]
    return f"127.0.0.1:{port}"


def _stop_heads() -> None:
    """Kill the Ray processes of the heads this module started, and only those, then drop the address `ray start`
    recorded. `ray stop --force` would kill every Ray on the machine: the other tests' studies run beside these."""
    import signal
    import time

    import psutil
    from ray._private.utils import get_ray_address_file

    def ours() -> list[psutil.Process]:
        found = []
        for p in psutil.process_iter():
            try:
                if os.getsid(p.pid) in _HEADS:
                    found.append(p)
            except (ProcessLookupError, PermissionError, psutil.Error):
                pass
        return found

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in ours():
            try:
                p.send_signal(sig)
            except psutil.Error:
                pass
        deadline = time.monotonic() + 10
        while ours() and time.monotonic() < deadline:
            time.sleep(0.2)
    assert not ours(), f"Ray processes of this test's heads still run: {[p.pid for p in ours()]}"
    _HEADS.clear()
    Path(get_ray_address_file(None)).unlink(missing_ok=True)


@pytest.fixture(params=["token", "disabled"])
def head(request):
    """A head as `ray start` makes it: with token authentication (Ray >= 2.59 where a token exists) and without."""
    yield _start_head(request.param)
    _stop_heads()


def test_without_address_the_study_starts_its_own_ray_next_to_a_running_cluster(private_ray_record, monkeypatch,
                                                                                capsys):
    """A bare `ray.init(num_cpus=...)` joins the cluster `ray start` recorded on this machine (or RAY_ADDRESS) and
    fails there with a traceback: without --address the study starts a Ray of its own, as it says it does, and
    names the cluster it did not join and how to join it."""
    import ray

    from study import tune_runner
    from study.config import load_study

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cpus = (os.cpu_count() or 1) + 3  # the head's CPUs, told apart from this machine's
    _start_head("disabled", cpus)
    assert (Path(private_ray_record) / "ray" / "ray_current_cluster").exists()  # not where the suite's studies look
    try:
        tune_runner.connect(load_study(ROOT / "configs" / "smoke.yaml"), None)
        assert "this study starts a Ray of its own on this machine: to run on that cluster, pass --address auto" in \
            capsys.readouterr().err
        tune_runner.start_local()
        try:
            assert ray.cluster_resources()["CPU"] == os.cpu_count()
        finally:
            ray.shutdown()
    finally:
        _stop_heads()
    assert tune_runner.cluster_here() is None
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    assert tune_runner.cluster_here() == "127.0.0.1:1"


@pytest.mark.slow
def test_joining_a_head_started_with_ray_start(head, tmp_path, cache_dir):
    impossible = run_cli(["-m", "study.run", "--grid", "configs/smoke.yaml", "--out", str(tmp_path), "--address",
                          head, "resources.gpus_per_worker=1"], cache_dir, timeout=120)
    _refused(impossible, tmp_path, f"resources.gpus_per_worker=1: a trial's worker needs 1 GPU on one node, but "
                                   f"the cluster at {head} has at most 0")
    proc = run_cli(["-m", "study.run", "--grid", "configs/smoke.yaml", "--out", str(tmp_path), "--address", head,
                    "models=[ViT-Pico/4]", "data.subsets=[256]", "evaluate.linear_probe=null", "evaluate.finetune=null",
                    "evaluate.diagnostics=null"], cache_dir, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "smoke" / "results.csv").exists()
    assert "Unauthenticated" not in proc.stderr  # Ray's C++ log of the auth probe's refused call (`_ping`)


def _kill_gcs() -> None:
    """SIGKILL the GCS of the heads this module started (a head node lost), and only theirs."""
    import psutil

    for p in psutil.process_iter(["name"]):
        try:
            if os.getsid(p.pid) in _HEADS and p.info["name"].startswith("gcs_server"):
                p.kill()
        except (ProcessLookupError, PermissionError, psutil.Error):
            pass


def test_the_cluster_watch_raises_in_the_main_thread_or_ends_the_study_from_its_own(capsys):
    """A GCS port that stops answering: after `grace` the main thread gets `ClusterLost` where it runs Python (Tune's
    loop between calls); a main thread held in one long call (Ray's C++ retrying the GCS; a sleep here) does not
    hear it, and `stuck` ends the study from the watch's thread instead."""
    import threading
    import time

    from study.tune_runner import ClusterLost, ClusterWatch

    for held in (False, True):
        server = socket.create_server(("127.0.0.1", 0))
        gcs = f"127.0.0.1:{server.getsockname()[1]}"
        stuck: list[tuple[ClusterLost, bool]] = []

        def end(err: ClusterLost, stuck=stuck) -> None:
            stuck.append((err, threading.current_thread() is threading.main_thread()))

        watch = ClusterWatch(gcs, end, grace=0.6, every=0.1, note=0.3, heard_within=0.3)
        watch.start()
        try:
            time.sleep(0.5)  # it answers: nothing happens
            server.close()
            with pytest.raises(ClusterLost, match=f"GCS at {gcs}"):
                if held:
                    time.sleep(2.0)  # the watch's interrupt is heard only after this call returns
                else:
                    for _ in range(40):
                        time.sleep(0.05)
        finally:
            watch.stop()
        assert [(type(err), in_main) for err, in_main in stuck] == ([(ClusterLost, False)] if held else [])
        assert f"ray: the cluster's Ray head (GCS at {gcs}) has not answered for" in capsys.readouterr().err


def test_errors_the_cluster_reports_print_their_first_line_only(capsys):
    """A raylet that ended reports its last 20 log lines and a state dump to the driver: one line is printed."""
    from ray._private import worker

    from study.tune_runner import cluster_errors_in_one_line

    before = worker.print_to_stdstream
    try:
        cluster_errors_in_one_line()
        cluster_errors_in_one_line()  # twice (a study run twice in one process): wrapped once
        dump = "Raylet is terminated. Termination is unexpected.\n    [state-dump] NodeManager ...\n    [2026] ..."
        worker.print_to_stdstream({"lines": [dump], "pid": "raylet", "is_err": False}, ignore_prefix=False)
        worker.print_to_stdstream({"lines": ["a worker's own\nsecond line"], "pid": 1234, "is_err": False,
                                   "ip": "127.0.0.1", "task_name": "t", "actor_name": "", "job": "01"},
                                  ignore_prefix=False)
    finally:
        worker.print_to_stdstream = before
    out = capsys.readouterr().out
    assert "Raylet is terminated. Termination is unexpected." in out and "state-dump" not in out
    assert "second line" in out  # other processes' output (shown where `verbose`) is left as it is


@pytest.mark.slow
def test_a_head_lost_mid_study_ends_its_runs_failed_in_one_line(tmp_path, cache_dir):
    """The head's GCS killed while a trial runs: Tune's loop in the driver then waits on the GCS in C++, and Ray's
    client would abort the driver `gcs_rpc_server_reconnect_timeout_s` later with a C++ log line and every MLflow run
    left RUNNING. The study ends first (at half that timeout, set to 20 s here): one line, exit 1, the parent and the
    running point's child FAILED with the reason, the checkpoint kept in storage for the rerun."""
    from mlflow.tracking import MlflowClient

    address = _start_head("token")
    try:
        args = ["-m", "study.run", "--grid", "configs/smoke.yaml", "--out", str(tmp_path), "--address", address,
                "models=[ViT-Pico/4]", "data.subsets=[1024]", "pretrain.steps=2000", "pretrain.batch_size=16",
                "pretrain.checkpoint_every=10"]
        with open(tmp_path / "err.txt", "w") as err:
            os.environ["RAY_gcs_rpc_server_reconnect_timeout_s"] = "20"
            try:
                proc = start_cli(args, cache_dir, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
            finally:
                del os.environ["RAY_gcs_rpc_server_reconnect_timeout_s"]
            try:
                wait_until(proc, lambda: checkpointed(tmp_path), "a checkpoint")
                _kill_gcs()
                assert proc.wait(timeout=60) == 1
            finally:
                proc.kill()
    finally:
        _stop_heads()
    lines = (tmp_path / "err.txt").read_text().strip().splitlines()
    assert "stopped answering" in lines[-1] and "1 point running end FAILED in MLflow" in lines[-1], lines[-8:]
    assert "once the cluster is back, rerun the same command to resume" in lines[-1]
    assert not [line for line in lines if "Failed to connect to GCS" in line or "Traceback" in line]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FAILED", "FAILED"]  # the parent and the one point
    assert all("stopped answering" in r.data.tags["failure_reason"] for r in runs)
    assert checkpointed(tmp_path)


def test_a_token_the_cluster_refuses_or_lacks_is_one_line(tmp_path, cache_dir, monkeypatch):
    """The cluster says it wants a token (asked, not guessed from local files): without one here, with a wrong one,
    or with authentication switched off here, the study stops in one line that says where the token goes."""
    address = _start_head("token")
    home = tmp_path / "home"  # no ~/.ray/auth_token there
    home.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    try:
        for env, said in [({"HOME": str(home)}, " and this machine has no token"),
                          ({"RAY_AUTH_TOKEN": "0" * 32}, " and refused this machine's token"),
                          ({"RAY_AUTH_MODE": "disabled"}, ", but RAY_AUTH_MODE=disabled here")]:
            with monkeypatch.context() as m:
                m.delenv("RAY_AUTH_MODE", raising=False)
                for key, value in env.items():
                    m.setenv(key, value)
                proc = run_cli(["-m", "study.run", "--grid", "configs/smoke.yaml", "--out", str(out), "--address",
                                address], cache_dir, timeout=60)
            _refused(proc, out, f"--address {address}: the cluster uses token authentication{said}")
            assert "copy the head's ~/.ray/auth_token here" in proc.stderr
    finally:
        _stop_heads()


def test_a_head_without_cpus_and_no_worker_node_is_refused_up_front(tmp_path, cache_dir):
    """`ray start --head --num-cpus=0` (a head kept free of work) with no worker node yet: no trial could be placed."""
    address = _start_head("token", cpus=0)
    try:
        proc = run_cli(["-m", "study.run", "--grid", "configs/smoke.yaml", "--out", str(tmp_path), "--address",
                        address], cache_dir, timeout=60)
    finally:
        _stop_heads()
    _refused(proc, tmp_path, f"resources.cpus_per_worker=1: a trial's worker needs 1 CPU on one node, but the "
                             f"cluster at {address} has at most 0")


@pytest.mark.slow
def test_two_nodes_trials_on_the_worker_node_files_through_storage(tmp_path, cache_dir, monkeypatch):
    """A head that runs no trial and a worker node; `--storage` is a folder apart from any trial's working directory.
    Every trial's node-local scratch is gone before the driver builds the report, so the complete report, figures
    and MLflow artifacts can only have come through the storage. The worker node has a cache of its own: it
    generates the procedural shards there and maps the index the driver stored, building none."""
    import psutil
    from mlflow.tracking import MlflowClient
    from ray.cluster_utils import Cluster

    from study.tune_runner import set_auth_mode

    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # as heads started with `ray start` run (Ray >= 2.59)
    set_auth_mode("token")  # and for this process's Ray, which has read its config already
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})  # the head places no trial
    node_cache = tmp_path / "node-cache"
    cluster.add_node(num_cpus=2, env_vars={"VITSCALE_CACHE": str(node_cache)})
    try:
        proc = run_cli(["-m", "study.run", "--grid", "configs/smoke.yaml", "--out", str(tmp_path / "runs"),
                        "--storage", str(tmp_path / "shared"), "--address", cluster.address,
                        "models=[ViT-Pico/4]", "evaluate.finetune.lr=0.01"], cache_dir, timeout=900)
    finally:
        cluster.shutdown()
    assert proc.returncode == 0, proc.stderr[-3000:]
    points = [p.name for p in (tmp_path / "shared" / "points").iterdir()]
    assert len(points) == 2
    stored = [p for p in (tmp_path / "shared" / "index").iterdir() if (p / "meta.json").exists()]
    assert len(stored) == 4  # pretraining train + test, the task's train + test: each built once, for the driver
    assert {json.loads((p / "meta.json").read_text())["built_by"] for p in stored} == {"cluster_map"}  # Ray tasks
    assert list(node_cache.glob("shapes-*/train-*.tar")) and not (node_cache / "index").exists()
    # None left by a process that is gone (this cluster's trials); a study beside this test may be running these points
    scratch = [d for p in points for d in (Path(tempfile.gettempdir()) / "vitscale-scratch").glob(f"{p}-*-pid*")]
    assert not [d for d in scratch if not psutil.pid_exists(int(d.name.rpartition("-pid")[2]))]
    study = tmp_path / "runs" / "smoke"
    table = pd.read_csv(study / "results.csv")
    assert sorted(table["subset_size"].unique()) == [256, 1024] and "fig7_ViT-Pico-4_n256_vs_n1024.png" in {
        f.name for f in (study / "figures").iterdir()}
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("smoke").experiment_id], "tags.study_role = 'point'")
    for run in runs:
        names = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"record.json", "class_counts.json", "model"} <= names and any(n.startswith("fig7_") for n in names)


def test_the_port_of_a_raylet_instead_of_the_gcs_is_one_line(tmp_path, cache_dir):
    """Another of the head's gRPC ports (its raylet's, as `ray status` lists beside the GCS's): it speaks gRPC, so
    only the GCS's own call tells them apart; refused naming the port to give, not with Ray's "RPC error:"."""
    port = _free_port()
    _start_head("disabled", 0, None, "--node-manager-port", str(port))
    try:
        proc = run_cli(["-m", "study.run", "--grid", "configs/smoke.yaml", "--out", str(tmp_path), "--address",
                        f"127.0.0.1:{port}"], cache_dir, timeout=60)
    finally:
        _stop_heads()
    _refused(proc, tmp_path, f"--address 127.0.0.1:{port}: 127.0.0.1:{port} answers gRPC, but not as a Ray "
                             "cluster's GCS; give the head's GCS port (`ray start --head --port PORT`, 6379 by "
                             "default)")


def test_an_address_where_something_else_listens_is_one_line_within_30_s(tmp_path, cache_dir):
    """A web server at the port: refused in one line, fast (Ray's own client would retry for minutes)."""
    import http.server
    import threading
    import time

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        start = time.monotonic()
        proc = run_cli(["-m", "study.run", "--grid", "configs/smoke.yaml", "--out", str(tmp_path), "--address",
                        f"127.0.0.1:{port}"], cache_dir, timeout=60)
        took = time.monotonic() - start
    finally:
        server.shutdown()
    _refused(proc, tmp_path, f"--address 127.0.0.1:{port}: 127.0.0.1:{port} answers, but not as a Ray cluster")
    assert took < 30


def _start_node_without(address: str, hidden: Path) -> None:
    """A worker node (`ray start --address`) in a mount namespace of its own, where `hidden` is an empty tmpfs: a
    node that does not mount the folder the driver's --storage names, as a cluster without a shared file system is."""
    script = 'mount -t tmpfs tmpfs "$1" && exec "$2" start --address "$3" --num-cpus 2'
    proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", str(hidden),
                             RAY, address], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "RAY_AUTH_MODE": "token"}, start_new_session=True)
    _HEADS.append(proc.pid)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out.decode()[-2000:]


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="a node that does not see a folder needs a mount namespace: root and unshare")
def test_a_node_that_does_not_see_the_local_storage_is_refused_before_any_work(tmp_path, cache_dir):
    """A cluster whose worker node has its own disk where the driver's --storage is: the trials placed there would
    keep their weights out of the driver's reach. Refused in one line naming the node, before any data or run; the
    lease the check read is released."""
    shared = tmp_path / "shared"
    shared.mkdir()
    address = _start_head("token", cpus=0)
    try:
        _start_node_without(address, shared)
        proc = run_cli(["-m", "study.run", "--grid", "configs/smoke.yaml", "--out", str(tmp_path / "runs"),
                        "--storage", str(shared), "--address", address], cache_dir, timeout=180)
    finally:
        _stop_heads()
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 1 node of 2 (") and (
        f"does not see the study's storage {shared} as the driver does" in last), last
    assert "Traceback" not in proc.stderr, proc.stderr
    assert not list(shared.iterdir())  # no index, point or lease left
    assert not (tmp_path / "runs" / "mlflow.db").exists()  # no MLflow run


def test_a_relative_data_path_on_a_cluster_is_refused_before_joining(tmp_path, cache_dir, monkeypatch, capsys):
    """On a cluster a trial runs where its node's `ray start` ran, so a relative path names another folder there:
    refused in one line naming the keys, before the address is even tried (nothing listens at it here)."""
    _refused_in_process(["--address", f"127.0.0.1:{_free_port()}", "data.cache_dir=relcache",
                         "data.pretrain.source=webdataset", "data.pretrain.urls=shards/train-{0..1}.tar;/abs/x.tar"],
                        tmp_path, cache_dir, monkeypatch, capsys,
                        "data.cache_dir=relcache: a relative path means another folder on each node of a cluster (a "
                        "trial there runs where that node's `ray start` ran); give an absolute path (and for "
                        "data.pretrain.urls)")

"""SIGINT and SIGTERM to the driver's process group (what a terminal's Ctrl-C and a scheduler send): trials stop at
their next step boundary with a checkpoint, MLflow says KILLED (never RUNNING or FINISHED), the driver exits
128 + the signal in one line, and the same command resumes from that checkpoint."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import ROOT, checkpointed, mlflow_statuses, run_cli, start_cli, wait_until

# Batch 16: the many steps leave time for the signal to land mid-pretraining (it lands ~50 steps after the first
# checkpoint), and each is cheap, so the rerun is short. Only the few-shot evaluation: these tests are about stopping.
ARGS = ["--grid", "configs/smoke.yaml", "models=[ViT-Pico/4]", "data.subsets=[1024]", "pretrain.steps=300",
        "pretrain.batch_size=16", "pretrain.checkpoint_every=20", "evaluate.linear_probe=null",
        "evaluate.finetune=null", "evaluate.diagnostics=null"]


def _steps(tmp_path) -> list[int]:
    return sorted(int(p.parent.name.rsplit("-", 1)[1])
                  for p in tmp_path.glob("smoke/storage/points/*/checkpoints/ckpt-*/state.pt"))


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_the_study_with_a_checkpoint_and_the_rerun_resumes(sig, tmp_path, cache_dir):
    """With SIGINT a second point waits behind the first (one trial at a time): stopped before it started, it gets
    no MLflow run and is not called a failure."""
    pending = ["data.subsets=[1024, 2048]", "resources.max_concurrent_trials=1"] if sig == signal.SIGINT else []
    args = ["-m", "study.run", "--out", str(tmp_path), *ARGS, *pending]
    points = 2 if pending else 1
    proc = start_cli(args, cache_dir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    wait_until(proc, lambda: checkpointed(tmp_path), "a checkpoint in storage")
    os.killpg(proc.pid, sig)  # the driver's whole process group, as a terminal or a scheduler signals a job
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + sig, err[-3000:]
    assert "Traceback" not in err and "core dumped" not in err and "Aborted" not in err, err[-3000:]
    assert err.strip().splitlines()[-1].startswith(
        f"stopped by {sig.name}: 0 of {points} points done, 1 stopped" + (", 1 not started" if pending else " ("))
    assert "rerun the same command to resume" in err
    assert f"storage:  {tmp_path / 'smoke' / 'storage'} (checkpoints, weights)" in err.splitlines()  # and the UI
    assert any(line.startswith("mlflow:   mlflow ui --backend-store-uri sqlite:///") for line in err.splitlines())
    assert "FAILED" not in out and "failed" not in out, out[-3000:]
    assert "completed. Last result" not in out  # Tune's word for the point the stop kept from starting
    assert "stopped by the driver at step" in out, out[-3000:]
    stopped_at = _steps(tmp_path)[-1]
    assert stopped_at % 5 == 0 and stopped_at < 300  # a step boundary, before the end
    assert mlflow_statuses(tmp_path) == ("KILLED", ["KILLED"])  # with SIGINT: no run for the point not started
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    assert not any("failed_points" in r.data.tags for r in runs)  # stopped, not failed
    assert [r.data.tags["stop_reason"] for r in runs if "mlflow.parentRunId" in r.data.tags] == [
        f"stopped by the driver at step {_steps(tmp_path)[-1]}; a rerun resumes there"]
    if sig == signal.SIGINT:
        return
    again = run_cli(args, cache_dir, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert mlflow_statuses(tmp_path) == ("FINISHED", ["FINISHED"])
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (child,) = client.search_runs([client.get_experiment_by_name("smoke").experiment_id],
                                  "tags.study_role = 'point'")
    assert child.data.metrics["resumed_from_step"] == stopped_at  # from the checkpoint of the stop
    assert "stop_reason" not in child.data.tags  # the stop is over: the run finished


def test_ctrl_c_while_torch_imports_is_one_line_not_a_traceback(tmp_path):
    """The driver's handlers are set in `main`, after seconds of importing torch, timm and Ray: a Ctrl-C before then
    ends the process as SIGINT does (130), in one line."""
    import time

    proc = start_cli(["-m", "study.run", "--out", str(tmp_path), "--dry-run", *ARGS], tmp_path / "cache",
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(0.3)  # importing takes ~4 s here
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode in (-signal.SIGINT, 128 + signal.SIGINT), err[-3000:]
    assert "Traceback" not in err and err.strip().splitlines() == ["stopped by SIGINT"], err[-3000:]


def test_a_signal_while_the_data_are_prepared_stops_the_driver_in_one_line(tmp_path):
    """No trial runs yet (the data are generated and indexed): SIGTERM stops the driver at once, in one line and
    128 + 15, where it used to end it without a word."""
    cache = tmp_path / "cache"
    args = ["-m", "study.run", "--out", str(tmp_path / "out"), *ARGS, "data.pretrain.size=60000"]
    proc = start_cli(args, cache, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    wait_until(proc, lambda: any(p.is_file() for p in cache.rglob("*")), "the data being generated")
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == ("error: stopped by SIGTERM; rerun the same command to resume (finished "
                                            "points are kept)")


@pytest.mark.slow
def test_a_second_signal_stops_at_once_and_leaves_no_run_running(tmp_path, cache_dir):
    """The first SIGINT asks the trials to stop; a second, before they have, stops the driver at once: the points it
    had started end KILLED in MLflow, not RUNNING."""
    log = tmp_path / "stderr.txt"
    args = ["-m", "study.run", "--out", str(tmp_path), *ARGS]
    with log.open("w") as err:
        proc = start_cli(args, cache_dir, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        wait_until(proc, lambda: checkpointed(tmp_path), "a checkpoint in storage")
        os.killpg(proc.pid, signal.SIGINT)
        wait_until(proc, lambda: "SIGINT: stopping" in log.read_text(), "the first signal's line")
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=300)
    text = log.read_text()
    assert mlflow_statuses(tmp_path) == ("KILLED", ["KILLED"])
    assert proc.returncode == 128 + signal.SIGINT, text[-3000:]
    assert "Traceback" not in text and text.strip().splitlines()[-1].startswith("error: stopped by SIGINT;"), text


def _trial_worker(driver_pid: int):
    """The Ray worker process that runs the study's trial (a descendant of the driver's local Ray)."""
    import psutil

    for p in psutil.Process(driver_pid).children(recursive=True):
        try:
            if "ImplicitFunc" in " ".join(p.cmdline()):
                return p
        except psutil.Error:
            continue
    return None


@pytest.mark.slow
def test_sigterm_to_a_trial_worker_checkpoints_and_the_retry_resumes_from_it(tmp_path, cache_dir):
    """A preempted node: SIGTERM to the worker that trains. It stops at its next step boundary with a checkpoint in
    storage and exits; Tune retries the trial, which resumes from that checkpoint; the study ends normally."""
    args = ["-m", "study.run", "--out", str(tmp_path), *ARGS, "pretrain.steps=150", "pretrain.checkpoint_every=7"]
    proc = start_cli(args, cache_dir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    wait_until(proc, lambda: checkpointed(tmp_path), "a checkpoint in storage")
    worker = _trial_worker(proc.pid)
    assert worker is not None
    seen = _steps(tmp_path)[-1]
    worker.send_signal(signal.SIGTERM)
    worker.wait(timeout=180)
    preempted_at = _steps(tmp_path)[-1]
    assert preempted_at > seen and preempted_at % 5 == 0  # a checkpoint made for the signal, at a step boundary
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
    assert mlflow_statuses(tmp_path) == ("FINISHED", ["FINISHED"])
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (child,) = client.search_runs([client.get_experiment_by_name("smoke").experiment_id],
                                  "tags.study_role = 'point'")
    assert child.data.metrics["resumed_from_step"] == preempted_at
    assert not list(tmp_path.glob("smoke/storage/points/*/preempted"))


def test_a_sigterm_swallowed_by_a_finaliser_is_delivered_again_without_a_stack(tmp_path):
    """Ray's SIGTERM handler raises SystemExit; where that lands in a weakref callback Python prints a traceback and
    goes on. In a trial's process the signal is delivered again, and the process exits without a stack."""
    script = (
        "import signal, sys, weakref\n"
        "from study.interrupt import exit_again_when_swallowed\n"
        "exit_again_when_swallowed()\n"
        "def handler(*_):\n"
        "    print('delivered again', flush=True)\n"
        "    sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, handler)\n"
        "class A: pass\n"
        "a = A()\n"
        "def swallowed(ref): raise SystemExit(1)\n"
        "r = weakref.ref(a, swallowed)\n"
        "del a\n"
        "import time; time.sleep(5)\n"
        "print('not exited')\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.strip() == "delivered again", (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr


def test_a_signal_while_ray_starts_is_held_until_it_has_and_rays_processes_ignore_it():
    """While `ray.init` starts the study's own Ray, SIGINT/SIGTERM to the driver were ignored: a Ctrl-C was lost (the
    study ran on) and a SIGTERM ended it without a word. Now the signal is held and raised as `Interrupted` once
    Ray has started (the driver then stops at once, in one line); what Ray spawns meanwhile still ignores both, in a
    process group of its own."""
    import time

    from ray._private import services

    from study.interrupt import Interrupted, ray_apart, stop_at_once

    restore, child, reached = stop_at_once(), None, False
    try:
        with pytest.raises(Interrupted) as caught, ray_apart():
            child = services.ConsolePopen(["sleep", "30"])
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)  # the signal's handler has run: Ray's start goes on
            reached = True
        assert reached and caught.value.signum == signal.SIGTERM
        status = (Path("/proc") / str(child.pid) / "status").read_text()
        ignored = int(next(line for line in status.splitlines() if line.startswith("SigIgn:")).split()[1], 16)
        assert all(ignored & (1 << (sig - 1)) for sig in (signal.SIGINT, signal.SIGTERM))
        assert os.getpgid(child.pid) == child.pid
    finally:
        if child is not None:
            child.kill()
        restore()


def test_a_stop_that_cannot_be_written_stops_at_once_in_one_line(tmp_path, capsys):
    """The first signal asks the trials to checkpoint through a file in the study's storage; where that file cannot
    be written (a full disk, storage gone), the driver says so and stops at once rather than promising a stop that
    the trials never hear of (they would run on to their end)."""
    from study.interrupt import STOP, Interrupt, Interrupted
    from study.storage import Storage

    (tmp_path / "storage").write_text("a file where the study's folder should be")  # every write fails: ENOTDIR
    interrupt = Interrupt(Storage(str(tmp_path / "storage")), lambda: True)
    with pytest.raises(Interrupted) as stopped:
        interrupt._on_signal(signal.SIGTERM, None)
    assert stopped.value.args == (signal.SIGTERM,) and interrupt.exit_code == 128 + signal.SIGTERM
    err = capsys.readouterr().err.strip()
    assert err.startswith("SIGTERM: could not ask the trials to checkpoint (") and err.count("\n") == 0
    assert "stopping at once (they resume from their last checkpoint)" in err
    assert not Storage(str(tmp_path)).exists(f"storage/{STOP}")


def test_storage_that_does_not_answer_neither_stops_a_trial_nor_raises_at_the_drivers_end(tmp_path):
    """A storage outage of a minute: the trial's look for the stop file reads "not asked" and training goes on (it
    raised, and every trial crashed at its next look, up to its retries); the driver's lease release, on its way out
    with the error that brought it there, does not raise a second one over it."""
    from study.interrupt import STOP, stop_requested
    from study.lease import Lease
    from study.storage import Storage

    storage = Storage(str(tmp_path / "storage"))
    lease = Lease(storage, "smoke")
    lease.acquire()
    ask = stop_requested(storage, every=0.0)
    answering = storage.fs

    class Down:
        def __getattr__(self, name):
            raise OSError("Could not connect to the endpoint")

    storage.fs = Down()
    assert ask() is False
    lease.release()  # no second error
    storage.fs = answering
    storage.write_bytes(STOP, b"SIGINT")
    assert ask() is True

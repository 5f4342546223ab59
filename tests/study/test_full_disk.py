"""A full disk under `--storage` (a 1 MB tmpfs: the indexes fit, a trial's first checkpoint does not): the trial is
not retried, the driver ends in one line naming the path and what to do, MLflow says FAILED (never RUNNING); with
space freed, the same command finishes the study."""

import subprocess

import pytest

from tests.conftest import mlflow_statuses, mount_tmpfs, run_cli

# Only the few-shot evaluation: the test is about the storage, which fails at the first checkpoint.
ARGS = ["--grid", "configs/smoke.yaml", "models=[ViT-Pico/4]", "data.subsets=[256]", "evaluate.linear_probe=null",
        "evaluate.finetune=null", "evaluate.diagnostics=null"]


@pytest.mark.slow
def test_a_full_storage_fails_the_trial_once_in_one_line_and_the_rerun_finishes(tmp_path, cache_dir):
    disk = mount_tmpfs(tmp_path / "disk", "size=1m")
    out, args = tmp_path / "out", ["-m", "study.run", *ARGS, "--storage", str(disk / "storage")]
    try:
        full = run_cli([*args, "--out", str(out)], cache_dir, timeout=600)
        assert full.returncode == 1 and "Traceback" not in full.stderr, full.stderr[-3000:]
        last = full.stderr.strip().splitlines()[-1]
        assert "No space left on device" in last and "free space there" in last, last
        assert str(disk / "storage") in last  # the path that is full
        assert full.stderr.count("No space left on device") <= 3  # said once or twice, not per retry
        assert mlflow_statuses(out) == ("FAILED", ["FAILED"])
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True, capture_output=True)
        again = run_cli([*args, "--out", str(out)], cache_dir, timeout=600)
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (out / "smoke" / "results.csv").exists()
    parent, children = mlflow_statuses(out)
    assert parent == "FINISHED" and children.count("FINISHED") == 1


def test_a_full_disk_under_the_mlflow_store_is_said_once_and_nothing_waits_on_it(tmp_path, capfd):
    """A local store whose disk fills: one line (no SQLAlchemy tracebacks, which MLflow logs for every failed
    write), the queued writes counted as not logged, and no wait for space a wait cannot bring back."""
    import time

    from study.tracking import Tracker

    disk = mount_tmpfs(tmp_path / "disk", "size=2m")
    try:
        tracker = Tracker(f"sqlite:///{disk / 'mlflow.db'}", "full", disk / "artifacts")
        with open(disk / "filler", "wb") as f:  # what else wrote to that disk
            try:
                while True:
                    f.write(bytes(1 << 16))
                    f.flush()
            except OSError:
                pass
        capfd.readouterr()
        for i in range(20):
            tracker.writer.submit(f"tag {i}", lambda i=i: tracker.client.set_experiment_tag(
                tracker.experiment_id, f"k{i}", "v" * 19_000))
        start = time.monotonic()
        assert tracker.close(timeout=60) == 20 and time.monotonic() - start < 10
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
    err = capfd.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err[-3000:]
    assert err.startswith(f"mlflow: the disk under sqlite:///{disk / 'mlflow.db'} is full ((sqlite3.OperationalError) "
                          "database or disk is full); this invocation logs nothing more there"), err

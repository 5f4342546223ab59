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

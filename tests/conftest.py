import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


# Tests that run one after another on one pytest-xdist worker, by file: the end-to-end studies (Ray, signals, kills
# timed against checkpoints) in two groups that run side by side (each study starts a Ray of its own,
# `address="local"`, which another beside it does not disturb), and apart from them the clusters (`ray start` heads
# and --address; a head's stop leaves the studies' Rays alone: tests/study/test_cluster). Every other test, the
# unit tests of `study` too, is shared out one by one. A file's module-scoped fixtures and the session's smoke study
# (`smoke`, tests/study/conftest.py) are made once per worker: their tests stay in one group (checked below).
SERIAL = {
    **dict.fromkeys(["test_e2e", "test_compare", "test_idempotent", "test_object_storage", "test_full_disk"],
                    "studies"),
    **dict.fromkeys(["test_signals", "test_lease", "test_data_parallel", "test_remote_tracking",
                     "test_add_evaluation", "test_changed_data"], "studies-2"),
    "test_cluster": "clusters",
}


def serial_group(nodeid: str) -> str | None:
    """The group of `SERIAL` a test runs in (None: shared out)."""
    path = nodeid.split("::")[0]
    return SERIAL.get(Path(path).stem) if path.startswith("tests/study/") else None


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """The default run has two pytest-xdist workers (`-n 2`, pyproject.toml): each group of `SERIAL` runs on one of
    them, in order, and the rest of the suite is shared out test by test. (xdist's own `--dist loadgroup` marks a
    group in the test's id, which pytest >= 9.2 no longer lets it rewrite.)"""
    if config.getvalue("dist") != "load":
        return None  # a --dist asked for on the command line
    from xdist.scheduler import LoadScopeScheduling

    class SerialGroups(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return serial_group(nodeid) or nodeid

    return SerialGroups(config, log)


def pytest_collection_modifyitems(config, items) -> None:
    """A test that starts a study or a Ray of its own (marked slow, under tests/study/) or reads the session's smoke
    study runs in a group of `SERIAL`, and every reader of the smoke study in the same one: shared out, it would
    run beside the others unplanned, or make the smoke study once more on the other worker."""
    unplanned = [item.nodeid for item in items if item.nodeid.startswith("tests/study/")
                 and serial_group(item.nodeid) is None
                 and (item.get_closest_marker("slow") or "smoke" in getattr(item, "fixturenames", ()))]
    readers = {serial_group(item.nodeid) for item in items if "smoke" in getattr(item, "fixturenames", ())}
    if unplanned:
        raise pytest.UsageError(f"tests/conftest.py SERIAL: add the file of {', '.join(unplanned)} to a group (it "
                                "starts a study or reads the smoke study)")
    if len(readers) > 1:
        raise pytest.UsageError(f"tests/conftest.py SERIAL: the smoke study's readers are in {sorted(readers)}; "
                                "put them in one group")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One shapes cache for the whole session (generated data is keyed by its parameters)."""
    return tmp_path_factory.mktemp("vitscale-cache")


def run_cli(args: list[str], cache: Path, timeout: int = 600, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "VITSCALE_CACHE": str(cache), "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=cwd)


def start_cli(args: list[str], cache: Path, **popen) -> subprocess.Popen:
    """`run_cli` in the background, for tests that interrupt a study."""
    env = {**os.environ, "VITSCALE_CACHE": str(cache), "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen([sys.executable, *args], env=env, cwd=ROOT, text=True, **popen)


def wait_until(proc: subprocess.Popen, condition, what: str, timeout: float = 420) -> None:
    """Poll `condition()` while `proc` runs; fail naming `what` if the study ends or time runs out first."""
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None and time.monotonic() < deadline, f"{what} did not happen"
        time.sleep(0.2)


def checkpointed(out: Path) -> bool:
    """A checkpoint of some grid point has reached the study's storage."""
    return bool(list(out.glob("smoke/storage/points/*/checkpoints/ckpt-*/state.pt")))


def mlflow_statuses(out: Path, experiment: str = "smoke") -> tuple[str, list[str]]:
    """The study's parent run status and its children's, from the MLflow store under `out`."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    parent = [r.info.status for r in runs if "mlflow.parentRunId" not in r.data.tags]
    return parent[0], [r.info.status for r in runs if "mlflow.parentRunId" in r.data.tags]


def mount_tmpfs(folder: Path, options: str) -> Path:
    """A tmpfs at `folder` (a small or read-only file system, for the tests of storage that is full or cannot be
    written); the test is skipped where mounting is not permitted (not root). Unmount with `umount`."""
    folder.mkdir(exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.decode().strip()[:200]}")
    return folder

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


# Tests that run one after another on one pytest-xdist worker: the studies (Ray, signals, kills timed against
# checkpoints), and apart from them the clusters (`ray start` heads and --address); the studies start Rays of their
# own (`address="local"`), which a head started beside them does not disturb, nor its stop (tests/study/test_cluster).
SERIAL = {"tests/study/test_cluster.py": "clusters", "tests/study/": "studies"}


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
            return next((group for prefix, group in SERIAL.items() if nodeid.startswith(prefix)), nodeid)

    return SerialGroups(config, log)


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

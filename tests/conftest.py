import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


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

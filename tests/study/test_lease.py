"""One driver per study: a second driver on the same storage stops in one line naming the holder; a lease whose
driver is gone (stale heartbeat, or a process of this machine that has ended) is taken over; --force-unlock; a
driver whose lease was taken stops instead of taking it back."""

import json
import os
import socket
import subprocess
import time

import psutil
import pytest

from study.lease import STALE_AFTER, Lease, LeaseHeld
from study.storage import Storage
from tests.conftest import ROOT, checkpointed, run_cli, start_cli, wait_until


def _lease(storage: Storage, **fields) -> None:
    body = {"token": "other", "host": socket.gethostname(), "pid": os.getpid(), "study": "smoke",
            "started": psutil.Process().create_time(), "heartbeat": time.time(), **fields}
    storage.write_bytes("lease.json", json.dumps(body).encode())


def test_a_second_driver_stops_in_one_line_before_it_prepares_any_data(tmp_path, cache_dir, monkeypatch, capsys):
    """The study's command run while another driver holds its lease: exit 2 with the holder named, and nothing of
    the study written (no index in storage, no MLflow store): the data are the lease holder's to prepare."""
    from study.run import main

    storage = Storage(str(tmp_path / "out" / "smoke" / "storage"))
    _lease(storage)
    monkeypatch.setenv("VITSCALE_CACHE", str(tmp_path / "cache"))  # empty: the shards would be generated here
    monkeypatch.chdir(ROOT)
    code = main(["--grid", "configs/smoke.yaml", "--out", str(tmp_path / "out")])
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and line.startswith("error: study 'smoke' in ") and "being run by another driver" in line
    assert storage.list_dir("") == ["lease.json"] and not list((tmp_path / "cache").rglob("*.*"))  # no shard
    assert not (tmp_path / "out" / "mlflow.db").exists()


def test_a_held_lease_stops_a_second_driver_and_a_stale_one_is_taken_over(tmp_path):
    storage = Storage(str(tmp_path / "storage"))
    _lease(storage)  # a live process of this machine (this one, standing in for another driver), renewed just now
    with pytest.raises(LeaseHeld, match=rf"being run by another driver \(host {socket.gethostname()}, "
                                        rf"pid {os.getpid()}, started .*--force-unlock"):
        Lease(storage, "smoke").acquire()
    _lease(storage, host="elsewhere")
    with pytest.raises(LeaseHeld):
        Lease(storage, "smoke").acquire()  # another machine's driver with a fresh heartbeat: held
    for stale in ({"host": "elsewhere", "heartbeat": time.time() - STALE_AFTER - 1},  # no heartbeat: gone
                  {"pid": 2**22 + 17}):  # a process of this machine that has ended
        _lease(storage, **stale)
        lease = Lease(storage, "smoke")
        lease.acquire()
        assert json.loads(storage.read_bytes("lease.json"))["token"] == lease.token
        lease.release()
        assert storage.read_bytes("lease.json") is None
    _lease(storage, host="elsewhere")
    lease = Lease(storage, "smoke")
    lease.acquire(force=True)  # the operator knows better
    lease.release()


def _told(told: list, at_least: int = 1) -> None:
    deadline = time.monotonic() + 10
    while len(told) < at_least and time.monotonic() < deadline:
        time.sleep(0.02)


def test_a_driver_whose_lease_was_taken_does_not_renew_it_and_is_told_until_it_releases(tmp_path):
    """Its heartbeat reads the lease first: another driver's token there (a `--force-unlock`, or a takeover after
    this driver stalled past STALE_AFTER), or no lease at all (taken and since released), and it never writes the
    lease again; it tells what `when_lost` registered, the latest first, at every beat until `release`, and `holds`
    is False."""
    storage, told = Storage(str(tmp_path / "storage")), []
    first = Lease(storage, "smoke", heartbeat=0.05)
    first.when_lost(lambda held: told.append(("lost", held["token"])))
    first.acquire()
    first.when_lost(lambda held: told.append(("dropped", held["token"])))
    assert first.holds() and not told
    second = Lease(storage, "smoke")
    second.acquire(force=True)
    _told(told, 4)
    assert told[:4] == [("dropped", second.token), ("lost", second.token)] * 2  # told again at the next beat
    assert not first.holds() and f"pid {os.getpid()}" in first.holder()
    assert json.loads(storage.read_bytes("lease.json"))["token"] == second.token  # never written back
    first.release()  # not its lease: left alone
    time.sleep(0.2)
    after = len(told)
    time.sleep(0.2)
    assert len(told) == after  # released: told no more
    assert json.loads(storage.read_bytes("lease.json"))["token"] == second.token
    second.release()
    assert storage.read_bytes("lease.json") is None

    gone = []
    third = Lease(storage, "smoke", heartbeat=0.05)
    third.when_lost(gone.append)
    third.acquire()
    storage.delete_file("lease.json")  # taken by another and released since: this driver must not write it back
    _told(gone)
    assert gone[0] == {} and "removed" in third.holder() and storage.read_bytes("lease.json") is None
    third.release()

    def unreachable(path):
        raise OSError("storage unreachable")

    storage.read_bytes = unreachable  # a study releases its lease after its last write, and `main` once more
    third.release()  # the second release touches nothing


@pytest.mark.slow
def test_two_drivers_on_one_study(tmp_path, cache_dir, monkeypatch, capsys):
    """While a first driver pretrains, a second started on the same study exits 2 in one line naming it. A third
    takes the study with --force-unlock (as after the first's heartbeat stalled past STALE_AFTER): at its next
    heartbeat the first stops its trial and exits 1 in one line, writing nothing more (it neither takes the lease
    back nor ends the run the third took over); the third resumes the first's checkpoint and finishes the study:
    every run FINISHED, the lease released. The second is `main` in this process (a Python start would cost ~8 s of
    imports, beside the first driver)."""
    from mlflow.tracking import MlflowClient

    from study.run import main

    monkeypatch.setenv("VITSCALE_LEASE_HEARTBEAT_S", "2")  # the first hears of the takeover within 2 s, not 20
    args = ["--grid", "configs/smoke.yaml", "--out", str(tmp_path), "models=[ViT-Pico/4]", "data.subsets=[256]",
            "pretrain.steps=500", "pretrain.checkpoint_every=50", "evaluate.linear_probe=null",
            "evaluate.finetune=null", "evaluate.diagnostics=null"]
    first = start_cli(["-m", "study.run", *args], cache_dir, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_until(first, lambda: checkpointed(tmp_path), "the first driver's first checkpoint")
    monkeypatch.setenv("VITSCALE_CACHE", str(cache_dir))
    monkeypatch.chdir(ROOT)
    code = main(args)
    stderr = capsys.readouterr().err
    assert code == 2 and "Traceback" not in stderr, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: study 'smoke' in ") and f"pid {first.pid}" in last

    third = run_cli(["-m", "study.run", *args, "--force-unlock"], cache_dir)
    _, err = first.communicate(timeout=120)
    assert third.returncode == 0, third.stderr[-3000:]
    assert first.returncode == 1 and "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: another driver took this study's lease (host ") and "the study is that" in last, err
    assert "resume" in third.stdout  # it took over the first's checkpoint
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}  # the parent and the one point
    assert not (tmp_path / "smoke" / "storage" / "lease.json").exists()


def test_the_lost_lease_handler_raises_only_for_its_lost_lease_and_a_stale_driver_asks_no_trial_to_stop(tmp_path):
    """The SIGUSR2 handler `main` installs raises LeaseLost while the lease is lost and not yet released, passes an
    outside SIGUSR2 to the handler before it, and is put back; a driver that no longer holds the study stops at
    once on Ctrl-C without writing the stop file, which the other driver's trials poll."""
    import signal

    from study.interrupt import STOP, Interrupt, Interrupted
    from study.lease import LeaseLost
    from study.run import LEASE_LOST, hear_lease_lost

    storage, heard = Storage(str(tmp_path / "storage")), []
    lease = Lease(storage, "smoke")
    before = signal.signal(LEASE_LOST, lambda signum, frame: heard.append(signum))
    try:
        unhear = hear_lease_lost(lease)
        handler = signal.getsignal(LEASE_LOST)
        handler(LEASE_LOST, None)  # not lost: someone else's SIGUSR2
        assert heard == [LEASE_LOST]
        lease.lost = {"token": "other", "host": "elsewhere", "pid": 7, "started": 0}
        with pytest.raises(LeaseLost, match="host elsewhere, pid 7"):
            handler(LEASE_LOST, None)
        lease.release()
        handler(LEASE_LOST, None)  # told once more after the driver stopped: nothing
        unhear()
        assert signal.getsignal(LEASE_LOST) is not handler and heard == [LEASE_LOST]
    finally:
        signal.signal(LEASE_LOST, before)

    _lease(storage, host="elsewhere")  # another driver holds the study now
    stale = Lease(storage, "smoke")
    with pytest.raises(Interrupted):
        Interrupt(storage, stale.holds)._on_signal(signal.SIGINT, None)
    assert not storage.exists(STOP) and stale.lost["host"] == "elsewhere"
    owner = Interrupt(storage, lambda: True)
    owner._on_signal(signal.SIGINT, None)  # the holder's first signal: its trials are asked to stop
    assert storage.exists(STOP)


def test_a_bad_heartbeat_setting_is_one_line_before_any_work(monkeypatch, capsys):
    from study.lease import heartbeat_seconds
    from study.run import main

    monkeypatch.chdir(ROOT)
    for raw in ("abc", "0", "-3", "nan", "inf"):
        monkeypatch.setenv("VITSCALE_LEASE_HEARTBEAT_S", raw)
        assert main(["--grid", "configs/smoke.yaml", "--dry-run"]) == 2
        err = capsys.readouterr().err
        assert err == (f"error: VITSCALE_LEASE_HEARTBEAT_S={raw!r}: give the lease's heartbeat in seconds, a number "
                       "> 0 (at most 40 counts), or unset it for 20\n"), err
    for raw, seconds in (("5", 5.0), ("100", 40.0)):
        monkeypatch.setenv("VITSCALE_LEASE_HEARTBEAT_S", raw)
        assert heartbeat_seconds() == seconds == Lease(Storage("/nonexistent"), "smoke").heartbeat

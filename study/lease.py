"""One driver per study: a lease file in the study's storage, renewed by a heartbeat while the driver runs.

A second driver on the same storage finds a fresh lease and stops with one line naming the holder; a lease whose
heartbeat is older than `STALE_AFTER` (its driver was killed, or lost its node) is taken over, and so is one held
by a process of this machine that no longer runs (a killed driver, rerun at once); `--force-unlock` takes one by
hand. Object stores have no exclusive create, so taking a lease is write, wait, read back: of two
drivers that write within the wait, the one whose write survived holds it and the other stops.

A driver that was only stalled (a suspended machine, storage out of reach for longer than `STALE_AFTER`), or whose
lease another driver took with `--force-unlock`, must not take it back: each heartbeat reads the lease first, and once
it holds another driver's token, or none (taken and since released), this driver has lost the study. It never writes
the lease again, and what `when_lost` registered is called (the driver drops its queued MLflow writes, stops its
trials at once and exits: the study is the other driver's now). Storage has no compare-and-swap, so a driver's beat
that reads its own lease just before another's `--force-unlock` overwrites it can still write it back; the other
driver then finds its lease taken at its next beat and stops, so one of the two goes on, never both (given storage
that does not serve stale reads).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.config import UserError

if TYPE_CHECKING:  # (`study.run` imports this module at start, and storage brings pyarrow)
    from study.storage import Storage

LEASE = "lease.json"
HEARTBEAT = 20.0  # seconds between renewals (`VITSCALE_LEASE_HEARTBEAT_S` sets another, at most STALE_AFTER / 3)
STALE_AFTER = 120.0  # a lease not renewed for this long belongs to a driver that is gone
SETTLE = 1.0  # seconds between writing a lease and reading it back


def heartbeat_seconds() -> float:
    """Seconds between renewals: `VITSCALE_LEASE_HEARTBEAT_S` (at most STALE_AFTER / 3), else HEARTBEAT.

    Raises:
        UserError: one line, where the variable is not a positive number.
    """
    raw = os.environ.get("VITSCALE_LEASE_HEARTBEAT_S")
    if raw is None:
        return HEARTBEAT
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < float("inf"):
        raise UserError(f"VITSCALE_LEASE_HEARTBEAT_S={raw!r}: give the lease's heartbeat in seconds, a number > 0 "
                        f"(at most {STALE_AFTER / 3:.0f} counts), or unset it for {HEARTBEAT:.0f}")
    return min(seconds, STALE_AFTER / 3)


class LeaseHeld(UserError):
    """Another driver holds the study's lease."""


class LeaseLost(KeyboardInterrupt):
    """Raised in the driver's main thread (as a signal would be) once another driver has taken its lease."""

    def __init__(self, holder: str):
        super().__init__(holder)
        self.holder = holder


class Lease:
    """Held from `acquire` to `release`; a daemon thread renews it every `HEARTBEAT` seconds."""

    def __init__(self, storage: Storage, study: str, heartbeat: float | None = None):
        self.storage, self.study = storage, study
        self.heartbeat = heartbeat or heartbeat_seconds()
        self.token = uuid.uuid4().hex
        self.started = time.time()
        self.lost: dict | None = None  # the lease that replaced this one ({} if it was removed), once taken
        self._told: list[Callable[[dict], None]] = []  # `when_lost`'s, the latest first
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def when_lost(self, do: Callable[[dict], None]) -> None:
        """Call `do(held)` when the lease is found taken, before what was registered earlier (so a driver drops its
        MLflow writes before it stops its trials); at once where it is already."""
        self._told.insert(0, do)
        if self.lost is not None:
            do(self.lost)

    @property
    def released(self) -> bool:
        return self._stop.is_set()

    def holds(self) -> bool:
        """Whether the lease in storage is still this driver's (a read; where storage cannot be read, as far as this
        driver knows). Finding it taken marks it lost, as the heartbeat would."""
        if self.lost is not None:
            return False
        try:
            held = self.read()
        except OSError:
            return True
        if not self._mine(held):
            self.lost = held or {}
        return self.lost is None

    def _mine(self, held: dict | None) -> bool:
        """Whether `held`, the lease read from storage (None: no lease), is this driver's."""
        return held is not None and held.get("token") == self.token

    def _body(self) -> dict:
        return {"token": self.token, "host": socket.gethostname(), "pid": os.getpid(), "study": self.study,
                "started": self.started, "heartbeat": time.time()}

    def read(self) -> dict | None:
        raw = self.storage.read_bytes(LEASE)
        try:
            return json.loads(raw) if raw is not None else None
        except ValueError:
            return None  # a torn or foreign file: treated as no lease

    def acquire(self, force: bool = False) -> None:
        """Take the lease, or raise LeaseHeld naming its holder."""
        held = None if force else self.read()
        if held is not None and not _gone(held):
            raise LeaseHeld(_holder(held, self.storage))
        self.storage.write_bytes(LEASE, json.dumps(self._body()).encode())
        time.sleep(SETTLE)
        now = self.read()
        if not self._mine(now):
            raise LeaseHeld(_holder(now or {}, self.storage))
        self._thread = threading.Thread(target=self._beat, name="study-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        """Renew the lease while it is this driver's. Once it is not (another driver's token, or no lease: taken
        and since released), never write it again, and tell `when_lost`'s at every beat until `release`: a driver
        interrupted in a place that swallows it (a finaliser) hears it again."""
        while not self._stop.wait(self.heartbeat):
            try:
                if self.lost is None:
                    held = self.read()
                    if self._stop.is_set():
                        return  # released while reading: the lease is no longer this thread's business
                    if not self._mine(held):  # taken: stale to another, or forced
                        self.lost = held or {}
                    else:
                        self.storage.write_bytes(LEASE, json.dumps(self._body()).encode())
                        continue
                for do in self._told:
                    do(self.lost)
            except OSError:
                pass  # storage briefly unreachable: the next beat tries again, well before STALE_AFTER

    def holder(self) -> str:
        """The driver that took this lease, in words (after `lost` is set)."""
        return _who(self.lost) if self.lost else "its lease file was removed: taken, and released, by another"

    def release(self) -> None:
        """Stop renewing, and remove the lease where it is still this driver's; a second call does nothing."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            if self._mine(self.read()):
                self.storage.delete_file(LEASE)
        except OSError:  # storage does not answer: the lease goes stale without its heartbeat, and the next driver
            pass  # takes it then (the error that brought the driver here is what it reports)


def lease_token_at(root: str) -> str | None:
    """The token of the lease in the local storage folder `root` (None: no lease there, or one that cannot be
    parsed). Plain file reads: run on each node of a cluster (`tune_runner.check_nodes_see`), where importing the
    storage layer would cost a fresh worker seconds of imports.

    Raises:
        OSError: where the folder cannot be read (an NFS hiccup): not an answer either way.
    """
    try:
        raw = (Path(root) / LEASE).read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        held = json.loads(raw)
    except ValueError:
        return None
    return held.get("token") if isinstance(held, dict) else None


def sees_lease(root: str, token: str, tries: int = 3, wait: float = 2.0) -> str | None:
    """`lease_token_at(root)`, read again up to `tries` times `wait` s apart while it is not `token`: a network
    file system may answer from a cache of the folder that predates the lease for a few seconds. Returns what was
    read last."""
    for attempt in range(tries):
        if (found := lease_token_at(root)) == token:
            return found
        if attempt + 1 < tries:
            time.sleep(wait)
    return found


def check_shared(storage: Storage, token: str | None) -> None:
    """A trial's own check that its node sees the driver's local storage folder (the driver checked the nodes of
    the cluster when it started, `tune_runner.check_nodes_see`; this one covers a node that joined since): the folder
    holds the lease with the driver's `token`. Nothing to check for an object store, or without a token.

    Raises:
        UserError: naming this node and what to give instead.
        OSError: where the folder cannot be read (Tune's retry may find it readable).
    """
    if token is None or (local := storage.local_path("")) is None:
        return
    if (found := sees_lease(str(local), token)) != token:
        raise UserError(not_shared(storage, f"this node ({socket.gethostname()})", other=found is not None))


def not_shared(storage: Storage, nodes: str, many: bool = False, other: bool = False) -> str:
    why = ("another lease is there: another folder, or another driver has taken the study" if other else
           "its lease is not there")
    return (f"{nodes} {'do' if many else 'does'} not see the study's storage {storage.root} as the driver does "
            f"({why}): a trial there would keep its checkpoints and weights on that node's own disk, out of the "
            "driver's reach; give --storage a folder every node mounts at the same path (NFS, a parallel file "
            "system), or an object store (s3://bucket/prefix)")


def _gone(held: dict) -> bool:
    """The lease's driver is gone: no heartbeat for `STALE_AFTER`, or it ran on this machine and its process has
    ended (or its pid now belongs to a process started after the lease)."""
    import psutil

    if time.time() - float(held.get("heartbeat", 0)) >= STALE_AFTER:
        return True
    if held.get("host") != socket.gethostname():
        return False
    try:
        return psutil.Process(int(held.get("pid", -1))).create_time() > float(held.get("started", 0)) + 1
    except (psutil.Error, ValueError):
        return True


def _who(held: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(held.get("started", 0))))
    return f"host {held.get('host', '?')}, pid {held.get('pid', '?')}, started {started}"


def _holder(held: dict, storage: Storage) -> str:
    age = time.time() - float(held.get("heartbeat", 0))
    return (f"study '{held.get('study', '?')}' in {storage.root} is being run by another driver ({_who(held)}, last "
            f"heartbeat {age:.0f} s ago); wait for it, or, if that driver is gone, rerun after {STALE_AFTER:.0f} s "
            f"without a heartbeat or with --force-unlock")

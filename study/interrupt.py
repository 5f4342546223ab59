"""SIGINT (Ctrl-C) and SIGTERM (Slurm, Kubernetes, spot preemption) to the driver: stop the study cleanly.

The first signal asks every trial to stop at its next step boundary: a stop file in the study's storage, which the
trials poll (`stop_requested`); each checkpoints and ends, points not yet started do not start, the MLflow runs of
the points left unfinished and the study's parent end KILLED, and the driver exits 128 + the signal's number with
one line saying how to resume. A second signal stops at once (`Interrupted`), and so does one while no trial runs
(`stop_at_once`: the data being prepared, the report); the runs the driver had marked RUNNING end KILLED all the same.

A terminal's Ctrl-C and a scheduler's SIGTERM go to the driver's whole process group, which would otherwise kill the
local Ray's GCS and raylet, and with them every trial, before any could checkpoint: `ray_apart` starts them in
process groups of their own, with both signals ignored (they still die with the driver: Ray binds them to it); a
signal to the driver while Ray starts is held until it has.

SIGTERM to a trial's worker (its node being preempted) is `preemption`'s: the trial checkpoints and Tune retries it.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from study.storage import Storage

STOP = "stop-requested"  # in the study's storage while a stop is asked for; removed when a driver starts
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM to the driver while no trial runs (checking data, logging what storage holds, the
    report), or a second one while they do (or the first, where the trials cannot be asked to stop: the stop file
    cannot be written): the driver stops at once, saying which signal, and exits 128 + its number."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _at_once(signum: int, frame) -> None:
    raise Interrupted(signum)


def stop_at_once() -> Callable[[], None]:
    """Install `Interrupted` for SIGINT and SIGTERM (SIGTERM would otherwise end the driver without a word, or
    with Ray's handler, `ray.init`'s, a bare exit); returns what puts the handlers before it back. A no-op outside
    the main thread, where handlers cannot be set."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    before = {sig: signal.getsignal(sig) for sig in SIGNALS}
    for sig in SIGNALS:
        signal.signal(sig, _at_once)

    def restore() -> None:
        for sig, handler in before.items():
            signal.signal(sig, handler)

    return restore


class Interrupt:
    """The driver's handler of SIGINT and SIGTERM while trials run (install it in the main thread, after Ray has
    started)."""

    def __init__(self, storage: Storage, owns: Callable[[], bool] | None = None):
        """`owns`: whether this driver still holds the study (`Lease.holds`); a driver that does not must not write
        the stop file, which every trial of the study polls, the other driver's included."""
        self.storage, self.signum, self.owns = storage, None, owns
        # Ends the study from another thread and exits, where Ray holds the main thread (a lost cluster: `launch`)
        self.last_words: Callable[[BaseException], None] | None = None

    def install(self) -> None:
        for sig in SIGNALS:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame) -> None:
        if self.signum is not None:
            raise Interrupted(signum)  # the second signal: at once
        if self.owns is not None and not self.owns():
            raise Interrupted(signum)  # another driver runs the study now: stop this one at once, asking nothing
        self.signum = signum
        try:
            self.storage.write_bytes(STOP, signal.Signals(signum).name.encode())
        except OSError as err:  # the trials cannot be asked (a full disk, storage unreachable): stop them at once
            print(f"\n{signal.Signals(signum).name}: could not ask the trials to checkpoint ({err}); stopping at "
                  "once (they resume from their last checkpoint)", file=sys.stderr, flush=True)
            raise Interrupted(signum) from None
        print(f"\n{signal.Signals(signum).name}: stopping; trials checkpoint at their next step (send it again to "
              "stop at once)", file=sys.stderr, flush=True)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "interrupted"

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGINT)


@contextmanager
def ray_apart() -> Iterator[None]:
    """While the block runs, processes that Ray starts (`ray.init`'s GCS, raylet, ...) are put in process groups of
    their own, with SIGINT and SIGTERM ignored (set in each before it runs Ray's code, and inherited by what it
    starts unless that handles them). A signal to the driver meanwhile is held, not lost, and raised as
    `Interrupted` when the block ends: Ray has started by then, and the driver stops at once, as it does while no
    trial runs (ignored in the driver, a Ctrl-C during Ray's start was lost and a SIGTERM ended it without a word)."""
    from ray._private import services  # where Ray spawns its processes: one class, patched for the block

    spawn = services.ConsolePopen
    apart = {"process_group": 0} if sys.version_info >= (3, 11) else {"start_new_session": True}

    class Apart(spawn):
        def __init__(self, *args, **kwargs):
            given = kwargs.get("preexec_fn")

            def deaf() -> None:  # in the child, between fork and exec
                for sig in SIGNALS:
                    signal.signal(sig, signal.SIG_IGN)
                if given is not None:
                    given()

            super().__init__(*args, **{**apart, **kwargs, "preexec_fn": deaf})

    held: list[int] = []
    before = {sig: signal.getsignal(sig) for sig in SIGNALS}
    for sig in SIGNALS:
        signal.signal(sig, lambda signum, frame: held.append(signum))
    services.ConsolePopen = Apart
    try:
        with keep_sigterm():
            yield
    finally:
        services.ConsolePopen = spawn
        for sig, handler in before.items():
            signal.signal(sig, handler)
    if held:
        raise Interrupted(held[0])


@contextmanager
def keep_sigterm() -> Iterator[None]:
    """`ray.init` as a driver first sets a SIGTERM handler of its own, `sys.exit(15)`: a SIGTERM while Ray starts or
    joins a cluster ended the driver with code 15 and not a word, its runs left FAILED. Within the block Ray's
    setter does nothing, and the driver's handler stays."""
    from ray._private import utils

    setter = utils.set_sigterm_handler
    utils.set_sigterm_handler = lambda handler: None  # ray.init calls it as `ray._private.utils.set_sigterm_handler`
    try:
        yield
    finally:
        utils.set_sigterm_handler = setter


def stop_requested(storage: Storage, every: float = 2.0) -> Callable[[], bool]:
    """A trial's `should_stop`: whether this worker is being preempted, or the stop file exists (looked up at most
    every `every` seconds; where storage does not answer, as far as the trial knows: not asked, and training goes
    on, so an outage of a minute does not crash every trial at its next look, the checkpoint being what needs it)."""
    state = {"at": 0.0, "stop": False}

    def ask() -> bool:
        if _PREEMPTED.is_set():
            return True
        if not state["stop"] and time.monotonic() - state["at"] >= every:
            state["at"] = time.monotonic()
            try:
                state["stop"] = storage.exists(STOP)
            except OSError:
                pass
        return state["stop"]

    return ask


_PREEMPTED = threading.Event()  # this worker process got SIGTERM: its trial stops at the next step boundary


@contextmanager
def preemption(storage: Storage, mark: str, grace: float = 120.0) -> Iterator[Callable[[], None]]:
    """A trial's guard against SIGTERM to its worker process (a preempted node, `kill`, a scheduler's drain).

    Ray's worker turns SIGTERM into SystemExit on its main thread and, on the way out, kills the worker's children
    (the data loader's processes), so the trial could not even finish its step. While a trial runs here, that exit
    is deferred: the first SIGTERM marks the point in storage and asks the trial to stop at its next step boundary
    (`stop_requested`). Once the trial has stored its checkpoint and called the yielded `saved()` (or `grace`
    seconds have passed) the worker exits as Ray would have, Tune's FailureConfig retries the trial, and the retry
    waits for the mark to go (`await_preempted_checkpoint`) and resumes from that checkpoint.
    """
    from ray._private import worker as ray_worker  # its SIGTERM handler calls this module attribute to exit

    exit_now = getattr(ray_worker, "raise_sys_exit_with_custom_error_message", None)
    saved = threading.Event()

    def exit_when_saved() -> None:
        try:
            storage.write_bytes(mark, str(time.time()).encode())
        except OSError:
            pass
        saved.wait(grace)
        os.kill(os.getpid(), signal.SIGTERM)  # Ray's handler again: this time the worker exits

    def deferred(*args, **kwargs):
        if _PREEMPTED.is_set() or saved.is_set():
            return exit_now(*args, **kwargs)
        _PREEMPTED.set()
        threading.Thread(target=exit_when_saved, name="preempted", daemon=True).start()
        return None

    def done() -> None:
        storage.delete_file(mark)
        saved.set()

    if exit_now is not None:
        ray_worker.raise_sys_exit_with_custom_error_message = deferred
    try:
        yield done
    finally:
        if exit_now is not None:
            ray_worker.raise_sys_exit_with_custom_error_message = exit_now
        if _PREEMPTED.is_set():
            done()


def preempted() -> bool:
    """This worker got SIGTERM (its trial stopped for that, not because the driver asked)."""
    return _PREEMPTED.is_set()


def await_preempted_checkpoint(storage: Storage, mark: str, grace: float = 120.0) -> None:
    """A retried trial starts while the preempted worker may still be saving: wait (at most `grace` seconds from
    the mark's time) until it has, so the retry resumes from the newest checkpoint, not the one before."""
    raw = storage.read_bytes(mark)
    if raw is None:
        return
    try:
        deadline = float(raw.decode()) + grace
    except ValueError:
        deadline = time.time() + grace
    while time.time() < deadline and storage.exists(mark):
        time.sleep(0.5)


def exit_again_when_swallowed() -> None:
    """In a trial's worker process: a SIGTERM (Ray's shutdown of an idle worker) whose SystemExit lands in a
    finaliser or weakref callback cannot exit there; Python would print it as "Exception ignored ... Traceback" on
    the driver's console and carry on. Deliver the signal again instead, so the exit happens where it can, silently."""
    if getattr(sys.unraisablehook, "_vitscale", False):
        return
    default = sys.unraisablehook

    def hook(unraisable) -> None:
        if isinstance(unraisable.exc_value, SystemExit):  # again from another thread, once this callback is left
            again = threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGTERM))
            again.daemon = True
            again.start()
            return
        default(unraisable)

    hook._vitscale = True
    sys.unraisablehook = hook

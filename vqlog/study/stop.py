"""How a sweep is asked to stop: `StopRequest`, which a signal handler (`vqlog.commands.sweep.
stop_on_signals`) or a notebook's other thread sets, and which the worker's loop and training read.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading


PARENT_GONE = "the sweep's main process ended"  # why a worker of --workers stops on its own


class StopRequest(threading.Event):
    """Set (by a signal handler, or by hand) to stop a worker cleanly: the running trial is
    checkpointed, marked FAIL and queued again, and no new trial starts. `signal` says why.
    A second Ctrl-C (KeyboardInterrupt) waits for the end of a `shield` block."""

    signal: str | None = None
    parent: int | None = None  # a worker of --workers: the process id of the sweep's process
    ctrl_c = False  # a SIGINT came: the next one stops at once
    shielded = 0  # shield blocks under way
    deferred = False  # a KeyboardInterrupt for the end of the outermost one

    def request(self, signal: str) -> None:
        self.signal = signal
        self.set()

    def orphaned(self) -> bool:
        """Whether this is a worker of --workers whose sweep process is gone: what stopped it
        (a SIGTERM before the sweep's process was killed, say) or not, nobody else writes the
        last table."""
        return self.signal == PARENT_GONE or (self.parent is not None
                                              and os.getppid() != self.parent)

    @contextlib.contextmanager
    def shield(self):
        """Steps that must not be cut in two by a Ctrl-C: a trial's FAIL and its retry. One
        Ctrl-C meanwhile is raised at the end; a further one at once (the handler's part)."""
        self.shielded += 1
        try:
            yield
        except BaseException:
            self.shielded -= 1
            self.deferred = self.deferred and self.shielded > 0  # ended by the exception
            raise
        self.shielded -= 1
        if not self.shielded and self.deferred:
            self.deferred = False
            raise KeyboardInterrupt


@contextlib.contextmanager
def signals_deferred():
    """SIGINT and SIGTERM held while a step that must not be cut in two runs (MLflow creating and
    migrating a new store: cut by Ctrl-C, an SQLite store was left half migrated, and every
    command after failed on it), then raised again, to the handlers there were before, also when
    the step fails. A second Ctrl-C meanwhile is raised at once, as "Ctrl-C again" promises.
    Python handlers are set in the main thread only, and only over handlers set from Python:
    elsewhere the step runs as it is."""
    sigs = (signal.SIGINT, signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread() or \
            any(signal.getsignal(sig) is None for sig in sigs):
        yield
        return
    got: list[int] = []
    before = {sig: signal.getsignal(sig) for sig in sigs}

    def restore() -> None:
        for sig, handler in before.items():
            signal.signal(sig, handler)

    def hold(signum, frame) -> None:
        if signum == signal.SIGINT and signal.SIGINT in got:  # Ctrl-C again: now, after the
            restore()  # ones held (a handler that stops cleanly on the first must see both)
            held = list(dict.fromkeys(got))
            got.clear()
            for sig in (*held, signum):
                signal.raise_signal(sig)
            return
        got.append(signum)

    for sig in sigs:
        signal.signal(sig, hold)
    try:
        yield
    finally:
        restore()
        for signum in dict.fromkeys(got):  # each once, in the order they came
            signal.raise_signal(signum)

"""The worker process of `vqlog-sweep --workers N` (`vqlog.study.pool`): one sweep worker,
its clean stop on signals, and its own pipe to the sweep's process.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import signal
import sys

from vqlog.errors import TrackingUnavailable, VqlogError
from vqlog.study.stop import PARENT_GONE, StopRequest

POLL_SECONDS = 1.0  # how often a worker checks that the sweep's process is still there
# The signals a worker stops cleanly on; blocked in it from its start until its handlers are in.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
NO_DEVICE = 3  # a worker's exit code where its GPU could not be used (its note says why)
# ... where importing the caller's script again (spawn's `__mp_main__`) called vqlog.sweep again
UNGUARDED = 87  # (not a code Python or a library exits with of its own)
UNGUARDED_ERROR = ("each worker process imports the script that called vqlog.sweep again (as "
                   "Python's spawn does), and its top level called vqlog.sweep once more: call "
                   "it under `if __name__ == \"__main__\":`")
WORKER_ERROR = -1  # `why` when the sweep stops because a worker failed
AT_ONCE = -2  # `why` when the sweep's process got a Ctrl-C again that its workers may not have


def worker_process(index: int, job: dict, device: str, threads: int, conn, parent: int,
                   why) -> None:
    """One worker process: its threads, its own clean stop on signals, its lines to the parent
    through `conn`, its own pipe's end (`ToParent`).

    It starts with SIGINT and SIGTERM blocked (`pool.run_pool` spawns it so, the mask inherited):
    a Ctrl-C or the parent's SIGTERM that comes while it imports torch waits until its handlers
    are in, and then asks for the same clean stop as one that comes mid-trial, instead of a
    KeyboardInterrupt traceback from an import or a death by SIGTERM's default action.
    `why` holds the signal the sweep stopped for (0 before): the SIGTERM the parent forwards
    stops this worker for that reason (a `kill -INT` of the parent alone is a Ctrl-C here too)."""
    os.set_inheritable(conn.fileno(), False)  # a process it starts must not hold the pipe open
    messages = ToParent(conn)
    try:
        _work(index, job, device, threads, messages, parent, why)
    finally:
        messages.close()  # every line sent before the process exits


def _work(index: int, job: dict, device: str, threads: int, messages, parent: int,
          why) -> None:
    os.environ["OMP_NUM_THREADS"] = str(threads)  # before torch starts its pool
    import torch

    torch.set_num_threads(threads)
    if device.startswith("cuda:"):  # the current GPU too, so no library makes a context on GPU 0
        try:  # a GPU that is gone or busy: a death with its reason (the others go on)
            torch.cuda.set_device(torch.device(device))
        except Exception as exc:  # noqa: BLE001 - torch's, of any kind, for this worker's line
            messages.put(("note", index, f"worker {index}: cannot use {device}: "
                                         f"{type(exc).__name__}: {' '.join(str(exc).split())}"))
            sys.exit(NO_DEVICE)
    from vqlog.cli import configure_process
    from vqlog.commands.sweep import stop_on_signals
    from vqlog.study import worker
    from vqlog.study.cores import CoreShare
    from vqlog.tracking.runs import Tracker

    configure_process()
    stop = WorkerStop(parent, why)
    with stop_on_signals(stop, quiet=True, restore=False):
        try:
            if hasattr(signal, "pthread_sigmask"):
                signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # a pending one: now
            _watch_parent(parent, stop)
            tracker = Tracker(job["tracking_uri"], lang=job["lang"])
            with CoreShare(limit=threads) as share:  # cores / N, fewer beside other processes
                summary = worker.run(job["spec"], job["trials"], job["storage"], tracker=tracker,
                                     device=device, timeout=job["timeout"], seed=job["seed"],
                                     out=lambda line: messages.put(("line", index, line)),
                                     note=lambda line: messages.put(("note", index, line)),
                                     stop=stop, bar=False, began=job["began"], cores=share)
            report = ("done", index, dataclasses.asdict(summary))
        except VqlogError as exc:  # a tracking outage as such: the command's advice follows it
            report = ("tracking" if isinstance(exc, TrackingUnavailable) else "error", index,
                      str(exc))
        except KeyboardInterrupt:
            report = ("done", index, None)
        except BaseException as exc:  # noqa: BLE001 - reported by the parent as this worker's
            report = ("error", index, f"{type(exc).__name__}: {exc}")
        # The sending thread sends the report while this process exits. A stop signal then
        # (the parent forwards one to every worker it sees alive) must neither kill the process
        # (SIGTERM's default action), losing the report, nor raise in it: ignored from here on.
        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_IGN)
        messages.put(report)


def stop_reason(name: str, why: int) -> str:
    """What stops a worker that got the signal `name`: a SIGTERM the parent forwarded is a stop
    for the parent's reason (`why`: its signal, WORKER_ERROR, AT_ONCE, or 0 before it stopped)."""
    if name != "SIGTERM" or not why:
        return name
    if why == WORKER_ERROR:
        return "another worker's error"
    return "SIGINT" if why == AT_ONCE else signal.Signals(why).name


class WorkerStop(StopRequest):
    """A worker's StopRequest: the SIGTERM the parent forwards stops it for the parent's reason
    (`why`, shared with the parent), and a Ctrl-C among them makes the next one stop it at once,
    as does the parent's AT_ONCE (a Ctrl-C again that reached the parent alone)."""

    def __init__(self, parent: int, why) -> None:
        super().__init__()
        self.parent, self.why, self.ctrl_c = parent, why, False

    @property
    def ctrl_c(self) -> bool:  # type: ignore[override]
        return self._ctrl_c or self.why.value == AT_ONCE

    @ctrl_c.setter
    def ctrl_c(self, value: bool) -> None:
        self._ctrl_c = value

    def request(self, signal: str) -> None:
        name = stop_reason(signal, self.why.value)
        self._ctrl_c = self._ctrl_c or name == "SIGINT"  # the next Ctrl-C: at once, as there
        super().request(name)


def _watch_parent(parent: int, stop) -> None:
    """Stop this worker cleanly, as SIGTERM would, once the process that started it is gone
    (killed with SIGKILL, or by the out-of-memory killer): a worker must not go on training
    unseen, with nobody to read its lines (they fail to send from now on)."""
    import threading

    def watch() -> None:
        while not stop.is_set():
            if os.getppid() != parent:
                stop.request(PARENT_GONE)
                return
            stop.wait(POLL_SECONDS)

    threading.Thread(target=watch, name="vqlog-parent-watch", daemon=True).start()


class ToParent:
    """A worker's end of its own pipe to the sweep process. `put` hands a message to a thread
    that sends it, so that a signal handled in the worker's main thread never cuts one in two;
    `close` waits until all are sent, or the parent is gone. One pipe per worker, not one
    multiprocessing.Queue for all: a worker killed (SIGKILL, the out-of-memory killer) while its
    queue's thread held the queue's shared write lock kept it held for good, and every other
    worker's lines stopped and their exits hung. A dead worker's pipe only closes."""

    def __init__(self, conn) -> None:
        import threading

        self._conn, self._items = conn, queue.SimpleQueue()
        self._thread = threading.Thread(target=self._send, name="vqlog-to-parent", daemon=True)
        self._thread.start()

    def put(self, message) -> None:
        self._items.put(message)

    def _send(self) -> None:
        from vqlog.failpoints import failpoint

        while (message := self._items.get()) is not None:
            failpoint("worker.send")  # a worker killed as it sends
            try:
                self._conn.send(message)
            except OSError:  # the parent is gone (BrokenPipeError): nobody reads them
                return

    def close(self) -> None:
        self._items.put(None)
        self._thread.join()

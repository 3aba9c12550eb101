"""`vqlog-sweep --workers N`: N worker processes on this host, sharing one study.

Each worker is a `study.worker.Worker` in a process of its own (the `spawn` start method: a
fresh interpreter, no state shared by fork), with cores / N torch threads, and with a CUDA device
of its own when --device cuda (round-robin over --gpus, several workers on one GPU if asked).
They meet only in the storage and the tracking store, as workers on several hosts do, so the
exact trial target holds across them. The parent prints their trial lines, keeps one progress
bar, and passes SIGTERM and Ctrl-C on: every worker stops cleanly (its trial checkpointed and
queued again) and the parent exits 143 (130 for Ctrl-C).
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import os
import queue
import signal
import sys
from datetime import datetime
from multiprocessing import resource_tracker
from typing import Callable

from vqlog.errors import SweepError, TrackingUnavailable, VqlogError
from vqlog.study.hosts import placements

POLL_SECONDS = 1.0
# The signals a worker stops cleanly on; blocked in it from its start until its handlers are in.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
NO_DEVICE = 3  # a worker's exit code where its GPU could not be used (its note says why)


def _child(index: int, job: dict, device: str, threads: int, messages, parent: int,
           why) -> None:
    """One worker process: its threads, its own clean stop on signals, its lines to the parent.

    It starts with SIGINT and SIGTERM blocked (`_signals_blocked`, inherited through the spawn):
    a Ctrl-C or the parent's SIGTERM that comes while it imports torch waits until its handlers
    are in, and then asks for the same clean stop as one that comes mid-trial, instead of a
    KeyboardInterrupt traceback from an import or a death by SIGTERM's default action.
    `why` holds the signal the sweep stopped for (0 before): the SIGTERM the parent forwards
    stops this worker for that reason (a `kill -INT` of the parent alone is a Ctrl-C here too)."""
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
    stop = worker.StopRequest()
    ask = stop.request
    stop.request = lambda name: ask(signal.Signals(why.value).name  # type: ignore[method-assign]
                                    if why.value and name == "SIGTERM" else name)
    with stop_on_signals(stop, quiet=True, restore=False):
        try:
            if hasattr(signal, "pthread_sigmask"):
                signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # a pending one: now
            _watch_parent(parent, stop, messages)
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
        # The queue's writer thread sends the report while this process exits. A stop signal
        # then (the parent forwards one to every worker it sees alive) must neither kill the
        # process (SIGTERM's default action), losing the report and perhaps leaving the queue's
        # shared write lock held, nor raise in it: ignored from here on, process-wide.
        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_IGN)
        messages.put(report)


PARENT_GONE = "the sweep's main process ended"


def _watch_parent(parent: int, stop, messages) -> None:
    """Stop this worker cleanly, as SIGTERM would, once the process that started it is gone
    (killed with SIGKILL, or by the out-of-memory killer): a worker must not go on training
    unseen, with nobody to read its lines. Its queue's feeder thread is then not waited for at
    exit, since nothing reads the pipe any more."""
    import threading

    def watch() -> None:
        while not stop.is_set():
            if os.getppid() != parent:
                messages.cancel_join_thread()
                stop.request(PARENT_GONE)
                return
            stop.wait(POLL_SECONDS)

    threading.Thread(target=watch, name="vqlog-parent-watch", daemon=True).start()


@contextlib.contextmanager
def _signals_blocked():
    """SIGINT and SIGTERM held back in this thread, and in a process started meanwhile: a
    signal mask survives fork and exec, so a spawned worker begins with them blocked (pending,
    not lost) until `_child` has its handlers. The mask before is put back after."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    before = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def _quiet_tracker() -> None:
    """The resource tracker multiprocessing starts beside this process cleans up the queue's
    semaphores of a parent killed with SIGKILL, and warns of them on its way out ("leaked
    semaphore objects"): noise in the sweep's output, the cleanup being its job. It takes this
    process's environment as it starts, so the warning is filtered there, and only there."""
    rule = "ignore::UserWarning:multiprocessing.resource_tracker"
    before = os.environ.get("PYTHONWARNINGS")
    os.environ["PYTHONWARNINGS"] = ",".join(filter(None, [before, rule]))
    try:
        resource_tracker.ensure_running()
    finally:
        if before is None:
            del os.environ["PYTHONWARNINGS"]
        else:
            os.environ["PYTHONWARNINGS"] = before


def run_pool(job: dict, n: int, device: str, gpus: list[int] | None, stop,
             out: Callable[[str], None] = print,
             tick: Callable[[], None] = lambda: None
             ) -> tuple[list[dict | None], list[str], list[int]]:
    """Start `n` workers on `job` (spec, trials, storage, tracking_uri, lang, timeout, seed),
    relay their lines to `out` (calling `tick` about every second) until all have exited, and
    return their summaries (as dicts; None for one stopped at once), the workers that died, and
    the trials those had ended (and of them failed), which no summary counts.
    `stop` (a StopRequest) set: every worker is asked to stop. A worker's error ends the others
    too, and is raised once all have exited: as TrackingUnavailable (the first worker's message)
    when every error was the tracking store's outage, as SweepError otherwise.

    A worker that dies without a word (SIGKILL from the kernel's out-of-memory killer or from a
    person, a crash in native code) is replaced by a new one on the same device if it had ended
    a trial; its own trial is retried by the study once its heartbeat is stale. One that died
    before it ended any trial would most likely die again (no memory for its model, a broken
    device): the others go on without it."""
    _quiet_tracker()
    ctx = multiprocessing.get_context("spawn")
    messages = ctx.Queue()
    why = ctx.RawValue("i", 0)  # the signal the sweep stops for, as the workers read it
    places = placements(n, device, gpus)

    procs: list = []  # slot i: worker i's process (a replacement takes its slot)

    def start(i: int) -> None:
        dev, threads = places[i]
        p = ctx.Process(target=_child, args=(i, job, dev, threads, messages, os.getpid(), why),
                        daemon=False, name=f"vqlog-worker-{i}")
        # The tracker that multiprocessing starts for a process's shared resources unblocks
        # SIGINT and SIGTERM in this thread when it is (re)started inside `start()`: started
        # first, so that the worker is spawned with them still blocked.
        resource_tracker.ensure_running()
        with _signals_blocked():
            p.start()
            procs[i:i + 1] = [p]

    said: list[bool] = []  # the worker in slot i reported its end (done or error)
    worked: list[bool] = []  # ... and it ended a trial (sent a line)
    summaries: list[dict | None] = []
    errors: list[tuple[int, str]] = []  # (worker, what it reported)
    lost: list[str] = []
    ended: list[list[int]] = []  # slot i's process: the trials it ended, and of them FAIL
    unsaid = [0, 0]  # the same, of processes that died without their summary
    outage = True  # every error a worker reported is a tracking outage
    forwarded = False

    def bury_the_dead() -> None:
        """Called with no message waiting: a worker's last words are always read before this.
        Exit codes first, then the queue once more: a worker that put its summary and exited
        since the last read has its words in the queue by now (its queue is flushed at exit)."""
        exited = [i for i, p in enumerate(procs) if not said[i] and p.exitcode is not None]
        if not exited or not messages.empty():
            return
        for i in exited:
            p = procs[i]
            said[i] = True
            unsaid[0] += ended[i][0]  # its trials, which no summary of its own will count
            unsaid[1] += ended[i][1]
            ended[i] = [0, 0]
            if stop.is_set() and -p.exitcode in STOP_SIGNALS:
                continue  # asked to stop, and ended by the signal itself: not a death
            how = _death(p.exitcode)
            replace = worked[i] and not stop.is_set()
            lost.append(f"worker {i} (pid {p.pid}) {how}")
            out(f"worker {i} (pid {p.pid}) {how}"
                + ("; perhaps out of memory" if p.exitcode == -signal.SIGKILL else "")
                + ("; a new worker takes its place, and its trial is retried once its "
                   "heartbeat is stale" if replace else
                   "; the sweep is stopping, so no new worker takes its place" if stop.is_set()
                   else "; it had not ended a trial, so no new worker takes its place"))
            if replace:
                start(i)
                said[i] = worked[i] = False

    try:
        for i in range(n):
            if stop.is_set():  # a stop asked while the others started: start no more
                break
            start(i)
            said.append(False)
            worked.append(False)
            ended.append([0, 0])
        while any(p.is_alive() for p in procs) or not messages.empty() or not all(said):
            if stop.is_set() and not forwarded:
                forwarded = True
                if stop.signal in ("SIGINT", "SIGTERM"):  # not another worker's error
                    why.value = signal.Signals[stop.signal]
                for p in procs:  # SIGTERM: a clean stop, also where the terminal's Ctrl-C did not reach
                    if p.is_alive():
                        os.kill(p.pid, signal.SIGTERM)
            tick()  # the parent's progress bar
            try:
                kind, index, payload = messages.get(timeout=POLL_SECONDS)
            except queue.Empty:
                bury_the_dead()
                continue
            if kind == "line":  # a trial's line: this worker has ended a trial
                worked[index] = True
                ended[index][0] += 1
                ended[index][1] += payload.split()[1:2] == ["FAIL"]
                out(payload)
            elif kind == "note":
                out(payload)
            elif kind == "done":
                said[index] = True
                summaries.append(payload)
                if payload is None:  # stopped by Ctrl-C with no summary: its lines count
                    unsaid[0] += ended[index][0]
                    unsaid[1] += ended[index][1]
            else:
                said[index] = True
                errors.append((index, payload))
                outage = outage and kind == "tracking"
                stop.request(stop.signal or "error")
    finally:
        for p in procs:  # alive only when leaving by an exception: ask them to stop first
            if p.is_alive():
                os.kill(p.pid, signal.SIGTERM)
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
                p.join()
    if errors and outage:  # one store for all of them: the first to give up says it
        raise TrackingUnavailable(errors[0][1])
    if errors:
        raise SweepError("; ".join(f"worker {index}: {payload}" for index, payload in errors))
    return summaries, lost, unsaid


def _death(exitcode: int) -> str:
    if exitcode < 0:
        try:
            return f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return "could not use its GPU" if exitcode == NO_DEVICE else \
        f"exited with {exitcode} without a word"


def sweep(spec, trials: int, storage: str, tracker, workers: int, device: str = "cpu",
          gpus: list[int] | None = None, timeout: float | None = None, seed: int | None = None,
          stop=None, out: Callable[[str], None] = print, data_checked: bool = False):
    """`workers` processes on one study until it has `trials` finished trials; one combined
    `SweepSummary`. The parent checks the data (unless the caller has: `data_checked`) and
    creates the study and its MLflow experiment and study run first, so the workers only load
    them."""
    from vqlog.data import DataCache
    from vqlog.study.progress import FinishedCount, TrialProgress
    from vqlog.study.outage import retrying
    from vqlog.study.storage import StudyLock, fail_stale_trials, open_study
    from vqlog.study.worker import (FINISHED, StopRequest, SweepSummary, best_trial_info,
                                    check_data)

    stop = stop if stop is not None else StopRequest()
    if not data_checked:  # loaded to be checked, then dropped: the workers load their own
        check_data(spec, DataCache(spec.source, spec.sample_rate, spec.channel), seed)
    tracker.check_experiment(spec.name)
    study, optuna_storage = open_study(spec, storage, seed)

    def db(call):  # this process's reads of the study ride out a database restart
        return retrying(optuna_storage, call)

    with StudyLock(storage, spec.name):
        # Killed workers' trials first, as a worker starts: a study at its target starts none.
        fail_stale_trials(study, optuna_storage)
        tracker.start_study(study, spec, db=db)

    def finished_once() -> int:
        return len(study.get_trials(deepcopy=False, states=FINISHED))

    def finished() -> int:
        return db(finished_once)

    progress = TrialProgress(trials, out)
    count = FinishedCount(finished_once, optuna_storage, POLL_SECONDS)

    def tick() -> None:
        count.raise_failed()
        if count.value is not None:
            progress.update(count.value)

    job = {"spec": spec, "trials": trials, "storage": storage, "lang": tracker.lang,
           "tracking_uri": tracker.given_uri, "timeout": timeout, "seed": seed,
           "began": datetime.now()}  # the workers' trials are this sweep's, not a killed one's
    summaries: list = []
    lost: list[str] = []
    unsaid = [0, 0]
    try:
        progress.resumed(finished())
        if finished() < trials:  # a study at its target starts no worker (each would only look)
            summaries, lost, unsaid = run_pool(job, workers, device, gpus, stop,
                                               out=progress.line, tick=tick)
    finally:
        count.close()
        progress.close()
    done = [s for s in summaries if s is not None]
    # A stop that came after the last trial had finished stopped nothing. The workers' own:
    # a signal sent to them and not to this process (Slurm's scancel, `kill` of the workers).
    stopped = None
    if finished() < trials:
        stopped = stop.signal if stop.is_set() else next(
            (s["stopped"] for s in done if s["stopped"]), None)
    stopped_at = [s["stopped_at"] for s in done if s["stopped_at"] is not None]
    timed_out = any(s["timed_out"] for s in done)
    grid_points = next((s["grid_points"] for s in done if s["grid_points"]), None)
    if lost and not stop.is_set() and not timed_out and not grid_points and finished() < trials:
        raise SweepError(
            f"{'; '.join(lost)}, and no worker is left: {finished()}/{trials} trials finished. "
            "Everything finished is kept; rerun the same command to go on (with fewer "
            "--workers if they ran out of memory)")
    return SweepSummary(
        study=spec.name, finished=finished(), target=trials,
        ran_here=sum(s["ran_here"] for s in done) + unsaid[0],
        failed_here=sum(s["failed_here"] for s in done) + unsaid[1],
        interrupted=len(done) < len(summaries) or any(s["interrupted"] for s in done),
        interrupted_trial=any(s["interrupted_trial"] for s in done),
        stopped=stopped, stopped_at=min(stopped_at) if stopped_at else None,
        stopped_iterations=sorted(stopped_at),
        timed_out=timed_out, grid_points=grid_points,
        best=db(lambda: best_trial_info(study, spec)),
        table_path=tracker.finish_study(study), workers=len(summaries), workers_lost=len(lost))

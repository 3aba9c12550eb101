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
import multiprocessing
import os
import signal
import sys
import time
from datetime import datetime
from multiprocessing import resource_tracker
from multiprocessing.connection import wait
from typing import Callable

from vqlog.errors import SweepError, TrackingUnavailable, UserError
from vqlog.study.child import (AT_ONCE, NO_DEVICE, STOP_SIGNALS, UNGUARDED, UNGUARDED_ERROR,
                               WORKER_ERROR, worker_process)
from vqlog.study.hosts import placements

POLL_SECONDS = 1.0
WORKER_FAILED = "error"  # the sweep's stop reason when a worker failed (the others then stop)


@contextlib.contextmanager
def _signals_blocked():
    """SIGINT and SIGTERM held back in this thread, and in a process started meanwhile: a
    signal mask survives fork and exec, so a spawned worker begins with them blocked (pending,
    not lost) until `worker_process` has its handlers. The mask before is put back after."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    before = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def _quiet_tracker() -> None:
    """The resource tracker multiprocessing starts beside this process cleans up the shared
    resources of a parent killed with SIGKILL (a multiprocessing.Queue's semaphores, which the
    workers' pipes no longer need, or a library's), and warns of them on its way out ("leaked
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
             tick: Callable[[], None] = lambda: None, done: Callable[[], bool] = lambda: False
             ) -> tuple[list[dict | None], list[str], list[int]]:
    """Start `n` workers on `job` (spec, trials, storage, tracking_uri, lang, timeout, seed),
    relay their lines to `out` (calling `tick` about every second) until all have exited, and
    return their summaries (as dicts; None for one stopped at once), the workers that died, and
    the trials those had ended (and of them failed), which no summary counts. `done()`: the
    study has its trials (a worker that dies then is not replaced); it must not wait long.
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
    why = ctx.RawValue("i", 0)  # the signal the sweep stops for, as the workers read it
    places = placements(n, device, gpus)

    procs: list = []  # slot i: worker i's process (a replacement takes its slot)
    pipes: list = []  # slot i: the read end of its pipe; None once it has ended

    def start(i: int) -> None:
        dev, threads = places[i]
        pipe, end = ctx.Pipe(duplex=False)
        p = ctx.Process(target=worker_process, args=(i, job, dev, threads, end, os.getpid(), why),
                        daemon=False, name=f"vqlog-worker-{i}")
        # The tracker that multiprocessing starts for a process's shared resources unblocks
        # SIGINT and SIGTERM in this thread when it is (re)started inside `start()`: started
        # first, so that the worker is spawned with them still blocked.
        resource_tracker.ensure_running()
        try:
            with _signals_blocked():  # (in this thread: a Ctrl-C another thread received is
                procs[i:i + 1] = [p]  # still handled here: the process is known before it starts)
                p.start()
        except BaseException:  # no process (fork's EAGAIN, no memory): no pipe either
            pipe.close()
            end.close()
            raise
        end.close()  # the worker's alone: the pipe ends when the worker does, however it ends
        pipes[i:i + 1] = [pipe]

    said: list[bool] = []  # the worker in slot i reported its end (done or error)
    worked: list[bool] = []  # ... and it ended a trial (sent a line)
    summaries: list[dict | None] = []
    errors: list[tuple[int, str]] = []  # (worker, what it reported)
    lost: list[str] = []
    ended: list[list[int]] = []  # slot i's process: the trials it ended, and of them FAIL
    unsaid = [0, 0]  # the same, of processes that died without their summary
    outage = [True]  # every error a worker reported is a tracking outage
    unguarded = [False]  # a worker ran the caller's unguarded script's vqlog.sweep (UNGUARDED)
    forwarded = False

    def handle(kind: str, index: int, payload) -> None:
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
            outage[0] = outage[0] and kind == "tracking"
            stop.request(stop.signal or WORKER_FAILED)

    def bury(i: int) -> None:
        """Worker i's pipe has ended: its last words, if any, are read, and its process has
        exited (or broke the pipe off as it died)."""
        pipes[i].close()
        pipes[i] = None
        p = procs[i]
        p.join(timeout=60)
        if p.exitcode is None:  # not reached: a pipe ends with its process
            p.kill()
            p.join()
        if not said[i]:
            said[i] = True
            unsaid[0] += ended[i][0]  # its trials, which no summary of its own will count
            unsaid[1] += ended[i][1]
            ended[i] = [0, 0]
            if stop.is_set() and -p.exitcode in STOP_SIGNALS:
                return  # asked to stop, and ended by the signal itself: not a death
            if p.exitcode == UNGUARDED:  # every worker does: the caller's error, said once
                unguarded[0] = True
                stop.request(stop.signal or WORKER_FAILED)
                return
            how = _death(p.exitcode)
            over = worked[i] and not stop.is_set() and done()
            replace = worked[i] and not stop.is_set() and not over
            lost.append(f"worker {i} (pid {p.pid}) {how}")
            out(f"worker {i} (pid {p.pid}) {how}"
                + ("; perhaps out of memory" if p.exitcode == -signal.SIGKILL else "")
                + ("; a new worker takes its place, and its trial is retried once its "
                   "heartbeat is stale" if replace else
                   "; the sweep is stopping, so no new worker takes its place" if stop.is_set()
                   else "; the study has its trials, so no new worker takes its place" if over
                   else "; it had not ended a trial, so no new worker takes its place"))
            if replace:
                try:
                    start(i)
                except OSError as exc:  # (just after an out-of-memory kill, say) the others go on
                    out(f"worker {i}: no new worker could start in its place ({exc})")
                    return
                said[i] = worked[i] = False

    try:
        for i in range(n):
            if stop.is_set():  # a stop asked while the others started: start no more
                break
            start(i)
            said.append(False)
            worked.append(False)
            ended.append([0, 0])
        while any(pipe is not None for pipe in pipes):
            if stop.is_set() and not forwarded:
                forwarded = True
                if stop.signal in ("SIGINT", "SIGTERM"):
                    why.value = signal.Signals[stop.signal]
                elif stop.signal == WORKER_FAILED:
                    why.value = WORKER_ERROR
                for p in procs:  # SIGTERM: a clean stop, also where the terminal's Ctrl-C did not reach
                    if p.is_alive():
                        os.kill(p.pid, signal.SIGTERM)
            tick()  # the parent's progress bar
            for pipe in wait([pipe for pipe in pipes if pipe is not None], POLL_SECONDS):
                try:
                    message = pipe.recv()
                except Exception:  # noqa: BLE001 - EOFError, or a message cut off by a death
                    bury(pipes.index(pipe))
                    continue
                handle(*message)
    finally:  # workers alive only when leaving by an exception
        at_once = isinstance(sys.exc_info()[1], KeyboardInterrupt)
        _end_workers([p for p in procs if p.pid is not None], at_once, why,
                     reached=at_once and _terminal_reached_them())
        for pipe in pipes:
            if pipe is not None:
                pipe.close()
    if unguarded[0]:
        raise UserError(UNGUARDED_ERROR)
    if errors and outage[0]:  # one store for all of them: the first to give up says it
        raise TrackingUnavailable(errors[0][1])
    if errors:
        raise SweepError("; ".join(f"worker {index}: {payload}" for index, payload in errors))
    return summaries, lost, unsaid


def _last_table(tracker, study) -> None:
    """The table, refreshed once more as the sweep ends on an error (one of its own is not
    raised over the sweep's)."""
    import logging

    from vqlog.errors import one_line

    try:
        tracker.finish_study(study)
    except Exception as exc:  # noqa: BLE001 - the error that ends the sweep comes first
        logging.getLogger("vqlog").warning("vqlog: the table was not written at the end (%s)",
                                           one_line(exc))


def _end_workers(procs: list, at_once: bool, why, reached: bool) -> None:
    """Workers still alive as the pool leaves by an exception are asked to stop cleanly
    (SIGTERM). After a Ctrl-C again (`at_once`) they stop at once: a terminal's reached them too
    (`reached`: nothing to add, where a further signal would cut their own clean-up), and where
    it came to this process alone (`kill -INT`, a notebook's interrupt, `docker run` without -t)
    `why` says AT_ONCE and a SIGINT follows. They get one minute in all (it was one each, in
    turn), then are killed; a further Ctrl-C meanwhile kills them now."""
    def send(sig: int) -> None:
        for p in procs:
            if p.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, sig)

    try:
        if not at_once:
            send(signal.SIGTERM)
        elif not reached:
            why.value = AT_ONCE  # read by their handler: this SIGINT stops them at once
            send(signal.SIGINT)
        deadline = time.monotonic() + 60
        for p in procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()


def _terminal_reached_them() -> bool:
    """Whether a Ctrl-C came from a terminal to the workers too: this process runs in the
    foreground process group of its controlling terminal, which the workers share."""
    try:
        fd = os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY)
    except OSError:  # no controlling terminal
        return False
    try:
        return os.tcgetpgrp(fd) == os.getpgrp()
    except OSError:
        return False
    finally:
        os.close(fd)


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
    from vqlog.study.retries import queued_retries
    from vqlog.study.retries import fail_stale_trials
    from vqlog.study.storage import StudyLock, open_study
    from vqlog.study.worker import FINISHED, StopRequest, SweepSummary, best_trial_info

    stop = stop if stop is not None else StopRequest()
    if not data_checked:  # loaded to be checked, then dropped: the workers load their own
        DataCache(spec.source, spec.sample_rate, spec.channel).check(spec, seed)
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
        progress.resumed(finished(), *db(lambda: queued_retries(study)))
        if finished() < trials:  # a study at its target starts no worker (each would only look)
            try:
                summaries, lost, unsaid = run_pool(
                    job, workers, device, gpus, stop, out=progress.line, tick=tick,
                    done=lambda: (now := count.fresh(3.0)) is not None and now >= trials)
                progress.update(finished())  # the bar's last frame: the count it ended at
            except TrackingUnavailable:  # no table to write there
                raise
            except (Exception, KeyboardInterrupt):  # a worker's error, a Ctrl-C again, the
                _last_table(tracker, study)  # database gone: the workers leave the last
                raise  # table to this process
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
    if lost and not stop.is_set() and not stopped and not timed_out and not grid_points and \
            finished() < trials:  # (stopped: a signal sent to the workers alone)
        _last_table(tracker, study)
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
        stopped_here=sum(s["stopped_at"] is not None or s["interrupted_trial"] for s in done),
        timed_out=timed_out, grid_points=grid_points,
        best=db(lambda: best_trial_info(study, spec)),
        table_path=tracker.finish_study(study), workers=len(summaries), workers_lost=len(lost))

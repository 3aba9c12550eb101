"""One sweep worker: `Worker(spec, trials, storage_url, tracker).run()`.

Every worker runs the same loop against the same storage; Optuna's RDB storage is the distributed
engine, and vqlog adds only an exact trial target. `trials` counts finished trials (COMPLETE +
PRUNED) across every worker: a worker counts and asks for its next trial under a storage-wide
lock (a PostgreSQL advisory lock, or a file lock beside an SQLite file), so "count, then ask" is
atomic and the study stops at exactly the target.

The worker asks and tells itself (Optuna's ask-and-tell interface) instead of calling
`study.optimize(n_trials=1)`: optimize asks inside, where the lock would have to be handed into
the objective to be released once the trial exists, and its heartbeat (which runs only inside
optimize) dies at the first failed beat. `trial.Heartbeat` beats instead.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from vqlog.config import grace_period
from vqlog.data import DataCache
from vqlog.failpoints import failpoint
from vqlog.errors import (StorageOutageError, SweepError, TrackingUnavailable, find_cause,
                          one_line)
from vqlog.study.progress import TrialProgress, best_text
from vqlog.study.spec import SweepSpec
from vqlog.study.stop import StopRequest
from vqlog.study.outage import retrying
from vqlog.study.retries import (CLAIM, fail_stale_trials, mark_stopped, queue_once,
                                 queued_retries, set_aside)
from vqlog.study.storage import StudyLock, open_study
from vqlog.study.trial import (LOST_REASON, OUTAGES, RUN_ID, Heartbeat, Objective, Outcome,
                               describe)

log = logging.getLogger("vqlog")
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
MAX_FAILS_IN_A_ROW = 5  # a spec whose trials all fail stops instead of looping forever
POLL_SECONDS = 2.0  # how often a worker re-checks while others finish the last trials


@dataclass
class SweepSummary:
    study: str
    finished: int
    target: int
    ran_here: int = 0
    failed_here: int = 0
    interrupted: bool = False  # KeyboardInterrupt
    interrupted_trial: bool = False  # ... during a trial's training: marked FAIL, queued again
    stopped: str | None = None  # the signal of a clean stop (SIGTERM, SIGINT)
    stopped_at: int | None = None  # the iteration the running trial was checkpointed at
    # with --workers: every worker's (stopped_at is the earliest), and how many workers stopped one
    stopped_iterations: list[int] = field(default_factory=list)
    stopped_here: int = 0  # (one worker: stopped_at or interrupted_trial says it)
    timed_out: bool = False
    grid_points: int | None = None  # a grid sampler's, when every point was taken short of target
    best: dict[str, Any] | None = None
    table_path: str | None = None
    workers: int = 1  # processes on this host (vqlog-sweep --workers)
    workers_lost: int = 0  # of those, how many died without a word (SIGKILL, a crash)


class Worker:
    """Runs trials of one study until it has `trials` finished ones; `run()` says what happened
    here. `tracker` (a `vqlog.tracking.runs.Tracker`, or None) logs every trial to MLflow."""

    def __init__(self, spec: SweepSpec, trials: int, storage_url: str, tracker=None,
                 device: str = "cpu", timeout: float | None = None, seed: int | None = None,
                 out: Callable[[str], None] = print, stop: StopRequest | None = None,
                 bar: bool = True, cache: DataCache | None = None,
                 note: Callable[[str], None] | None = None, began: datetime | None = None,
                 cores=None):
        self.spec, self.target, self.storage_url, self.tracker = spec, trials, storage_url, tracker
        # when this sweep began (its first worker, with --workers): trials that started before
        # are another sweep's, perhaps a killed one's, which the waiting line is about
        self.began = began or datetime.now()
        self.device, self.timeout, self.seed, self.out = device, timeout, seed, out
        self.note = note  # a line that is not a trial's (None: as a trial's line goes)
        self.cores = cores  # a cores.CoreShare: the torch threads set as each trial starts
        self.stop = stop if stop is not None else StopRequest()
        self.bar = bar  # a progress bar on a terminal (not in a worker of --workers)
        # `cache`: the data the caller has already checked (`api.load_data`), loaded once
        self.cache = cache or DataCache(spec.source, spec.sample_rate, spec.channel)
        self.summary = SweepSummary(study=spec.name, finished=0, target=trials)
        self.fails_in_a_row = 0
        self.last_fail_reason = ""

    # ------------------------------------------------------------------------- the loop

    def run(self) -> SweepSummary:
        self._open()
        self.progress = TrialProgress(self.target, self.out, bar=self.bar)
        self.said_waiting = False  # the line on a wait for other workers' trials, said once
        try:
            if self.bar:  # a worker of --workers leaves it to the parent
                self.progress.resumed(self._count()[0], *self._db(lambda: queued_retries(self.study)))
            while (trial := self._next_trial()) is not None:
                trial_id = self._db(lambda: self.storage.get_trial_id_from_study_id_trial_number(
                    self.study_id, trial.number))
                outcome = self._run(trial, trial_id)
                self._record(trial_id, outcome)
                if outcome.fatal is not None:
                    raise outcome.fatal
        except KeyboardInterrupt:
            self.summary.interrupted = True
            if self.summary.interrupted_trial:  # marked FAIL by _run: counted as such too
                self.summary.ran_here += 1
                self.summary.failed_here += 1
        except SweepError:  # trials failing in a row: the table is written as at any end
            if self.tracker is not None:
                try:
                    self.tracker.finish_study(self.study)
                except Exception as exc:  # noqa: BLE001 - the error that ends the sweep first
                    log.warning("vqlog: the table was not written at the end (%s)", one_line(exc))
            raise
        finally:
            self.progress.close()
        self.summary.finished = self._count()[0]
        if self.summary.finished >= self.target:
            self.summary.stopped = None  # a stop that came after the last trial stopped nothing
        self.summary.best = self._db(lambda: best_trial_info(self.study, self.spec))
        # a worker of --workers leaves the last table and plots to the sweep's process (N + 1)
        if self.tracker is not None and (self.bar or self.stop.orphaned()):
            self.summary.table_path = self.tracker.finish_study(self.study)
        return self.summary

    def _open(self) -> None:
        """Everything that can be bad input first (the data, a deleted experiment), then the
        study, then its MLflow experiment and study run."""
        self.cache.check(self.spec, self.seed)
        if self.tracker is not None:
            self.tracker.check_experiment(self.spec.name)  # before the study exists
        self.study, self.storage = open_study(self.spec, self.storage_url, self.seed,
                                              self.cache.identity())
        self.study_id = self._db(lambda: self.storage.get_study_id_from_name(self.spec.name))
        self.lock = StudyLock(self.storage_url, self.spec.name)
        self.table_lock = StudyLock(self.storage_url, self.spec.name, purpose="table")
        self.objective = Objective(self.spec, self.cache, self.tracker, self.device, self.seed,
                                   self.storage, self.stop, self.cores)
        with self.lock:
            # Killed workers' trials first, so start_study's reconcile closes their runs now.
            fail_stale_trials(self.study, self.storage)
            if self.tracker is not None:
                # Under the lock: two workers starting together would each create a study run.
                self.tracker.start_study(self.study, self.spec, db=self._db)

    def _next_trial(self) -> optuna.Trial | None:
        """The next trial, asked for under the study lock while the finished and running trials
        fall short of the target; None when the study is done or the time is up."""
        unheld = None  # a trial asked after the lock went with its session (a database restart)
        while not self.stop.is_set():
            with self.lock:
                if self.stop.is_set():  # asked while this worker waited for the lock
                    break
                fail_stale_trials(self.study, self.storage)  # a dead worker's trial: FAIL + retry
                finished, running, oldest = self._count()
                if unheld is not None:  # another worker may have asked meanwhile: one too many?
                    if finished + running <= self.target:
                        return unheld
                    self._db(lambda: set_aside(self.study, unheld))  # a queued row: again
                    (finished, running, oldest), unheld = self._count(), None
                self.progress.update(finished)
                if finished >= self.target:
                    return None
                # from the sweep's start: a worker of --workers started late stops with the rest
                if self.timeout is not None and time.time() - self.began.timestamp() > self.timeout:
                    self.summary.timed_out = True
                    return None
                if self.fails_in_a_row >= MAX_FAILS_IN_A_ROW:
                    raise SweepError(
                        f"{self.fails_in_a_row} trials in a row failed here (last: "
                        f"{self.last_fail_reason}); check the spec and data, then rerun")
                if finished + running < self.target and not self._grid_taken():
                    unheld = self._db(self._ask)
                    if not self.lock.lost():
                        return unheld
                    continue  # counted again under the lock
                if finished + running < self.target and not running:  # a grid's points all
                    return None  # taken; a RUNNING one may be a killed worker's: waited for
            # The others are running the last trials: wait for them. A worker that has run none
            # says why it is quiet (after a kill, the dead worker's trial holds the target until
            # its heartbeat goes stale).
            if (not self.said_waiting and self.summary.ran_here == 0 and oldest is not None
                    and oldest < self.began):
                self.said_waiting, what = True, "grid" if self.summary.grid_points else "target"
                (self.note or self.progress.line)(
                    f"waiting: {running} trial{'s' * (running != 1)} still RUNNING "
                    f"cover{'s' * (running == 1)} the {what} (a killed worker's trial is failed "
                    f"and retried once its heartbeat is {grace_period()} s old)")
            self.stop.wait(POLL_SECONDS)
        if unheld is not None:  # a stop came before it was counted again: set aside
            self._db(lambda: set_aside(self.study, unheld))
        self.summary.stopped = self.stop.signal
        return None

    def _grid_taken(self) -> bool:
        """Whether a grid's points are all taken and none queued (asking again runs one twice)."""
        if self.spec.sampler != "grid":
            return False
        trials = self._db(lambda: self.study.get_trials(deepcopy=False))
        if any(t.state == TrialState.WAITING for t in trials) or self.spec.grid_left(trials):
            return False
        self.summary.grid_points = math.prod(len(v) for v in self.spec.grid().values())
        return True

    def _ask(self) -> optuna.Trial:
        """A new trial (or a queued one). With --seed S, the sampler is seeded anew from S and
        the number of trials the study has: one uninterrupted worker repeats itself exactly,
        while a resumed study or a second worker given the same S draws new parameters (the
        same seed every time proposed the same points again, optuna#4714). Queued rows keep
        their parameters; a grid visits each point once whatever the seed."""
        failpoint("worker.ask")  # under the study lock, the trials counted
        if self.seed is not None:
            number = len(self.study.get_trials(deepcopy=False))
            self.study.sampler = self.spec.make_sampler(sampler_seed(self.seed, number))
        with warnings.catch_warnings():
            # "Heartbeat of storage is supposed to be used with Study.optimize": without
            # optimize's heartbeat thread nothing would beat for the trial; trial.Heartbeat does.
            warnings.filterwarnings("ignore", "Heartbeat of storage", UserWarning)
            trial = self.study.ask()
        if self.spec.sampler == "grid":
            # the point, set while this worker holds the lock: the next one's `_grid_taken`
            # counts it (the objective's suggest gets the same values back)
            for param in self.spec.space:
                param.suggest(trial)
        return trial

    def _run(self, trial: optuna.Trial, trial_id: int) -> Outcome:
        """Beat, claim, run the objective, and tell Optuna how it ended."""
        with Heartbeat(self.storage, trial_id):
            try:
                self._claim(trial)
            except optuna.exceptions.UpdateFinishedTrialError:  # a database outage longer than
                # the grace period between asking and claiming: another worker failed the trial
                # as unclaimed, and queued its retry
                return Outcome(TrialState.FAIL, reason=LOST_REASON, lost=True)
            frozen = self._db(lambda: self.storage.get_trial(trial_id))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                history = RetryHeartbeatStaleTrialCallback.retry_history(frozen)
            try:
                outcome = self.objective(trial, history, "fixed_params" in frozen.system_attrs)
            except KeyboardInterrupt:  # a second Ctrl-C: no checkpoint now, yet the trial (a
                # grid point, a spec's queued row) runs again, from an earlier checkpoint if any
                self.summary.interrupted_trial = True
                self._fail_and_queue(trial, trial_id, Outcome(
                    TrialState.FAIL, reason=describe(KeyboardInterrupt())))
                raise
            if outcome.stopped_at is None:
                self._tell(trial, outcome)
            else:  # (its checkpoint said also after a Ctrl-C deferred to the end of both)
                self.summary.stopped_at, self.summary.stopped_iterations = \
                    outcome.stopped_at, [outcome.stopped_at]
                try:
                    self._fail_and_queue(trial, trial_id, outcome)
                except KeyboardInterrupt:  # counted as a trial cut off by Ctrl-C
                    self.summary.interrupted_trial = True
                    raise
        if outcome.state in (TrialState.COMPLETE, TrialState.PRUNED) and outcome.run is not None:
            self.tracker.drop_checkpoints(outcome.run.run_id, history)  # none resumes it now
        if outcome.state == TrialState.COMPLETE and self.tracker is not None:
            self._register_best()
        return outcome

    def _fail_and_queue(self, trial: optuna.Trial, trial_id: int, outcome: Outcome) -> None:
        """A trial stopped by a signal runs again (from its checkpoint) on the next run: its
        retry is queued as Optuna queues a dead worker's, with no limit on how often. Its retry
        and its FAIL at once, under the lock: a worker asking in between would start a new trial
        in its place, and the retry would wait for good. Not when another worker took it for dead
        meanwhile and queued it itself. A Ctrl-C meanwhile waits for both (`shield`). The retry
        first: killed before the FAIL, the trial stays RUNNING and the stale check finds its
        retry queued (`retries.retry_killed`); killed after a FAIL, its retry was lost."""
        # The wait for the lock is not shielded: a Ctrl-C then leaves the trial RUNNING, and
        # another worker's stale-trial check retries it, as a stop (the mark), not a kill.
        self._db(lambda: mark_stopped(trial))
        with self.lock, self.stop.shield():
            frozen = self._db(lambda: self.storage.get_trial(trial_id))
            if frozen.state == TrialState.RUNNING:  # ours; once, if a reply was lost
                self._db(lambda: queue_once(self.study, frozen))
            failpoint("trial.requeue")
            self._tell(trial, outcome)

    def _register_best(self) -> None:
        """The registered model `<study>` @ `best` follows the study's best trial (under the
        lock: two workers finishing together must not move it back and forth)."""
        with self.lock:
            best = self._db(lambda: best_trial(self.study))
            if best is not None:
                self.tracker.register_best(best.number, best.user_attrs.get(RUN_ID))

    def _claim(self, trial: optuna.Trial) -> None:
        """Mark the trial as run by a live worker (see retries.fail_stale_trials). A retry
        inherits its original's user attrs: its failure reason is not this trial's."""
        if "fail_reason" in trial.user_attrs:  # first: a claimed trial with a reason is one
            self._db(lambda: trial.set_user_attr("fail_reason", None))  # its worker failed
        self._db(lambda: trial.set_user_attr(CLAIM, trial.number))

    def _tell(self, trial: optuna.Trial, outcome: Outcome) -> None:
        """Optuna's record of the outcome, sent again after a lost connection: skip_if_finished
        makes a repeat of a tell that did commit harmless. Finding the trial failed when it ran
        to the end here means another worker took this one for dead (`Outcome.lost`), and so
        does a tell whose write finds the trial failed after its read had found it running."""
        if outcome.lost or isinstance(outcome.fatal, StorageOutageError):
            return  # failed already, or the database is gone (its trial goes stale, is retried)
        try:
            state = self._db(lambda: self.study.tell(trial, outcome.values, state=outcome.state,
                                                     skip_if_finished=True)).state
        except optuna.exceptions.UpdateFinishedTrialError:
            state = TrialState.FAIL  # only a stale check fails a trial another worker runs
        if state == TrialState.FAIL and outcome.state != TrialState.FAIL:
            outcome.state, outcome.reason, outcome.lost = TrialState.FAIL, LOST_REASON, True
            if outcome.run is not None:
                outcome.run.finish("FAIL", reason=LOST_REASON)

    def _record(self, trial_id: int, outcome: Outcome) -> None:
        self.summary.ran_here += 1
        failed = outcome.state == TrialState.FAIL
        self.summary.failed_here += failed
        if failed and not outcome.lost:
            self.fails_in_a_row += 1
            reason = outcome.reason  # as the trial line shows it
            self.last_fail_reason = reason if len(reason) <= 300 else reason[:299] + "…"
        elif not failed:
            self.fails_in_a_row = 0
        if isinstance(outcome.fatal, StorageOutageError):
            return  # nothing can be read back now
        frozen = self._db(lambda: self.storage.get_trial(trial_id))
        best = self._db(lambda: best_trial(self.study))
        self.progress.trial_line(best_text(best), frozen, outcome.reason if failed else "")
        if self.tracker is not None and not isinstance(outcome.fatal, TrackingUnavailable):
            written = self.tracker.after_trial(self.study, self.table_lock)
            self.summary.table_path = written or self.summary.table_path

    # ---------------------------------------------------------------------------- helpers

    def _count(self) -> tuple[int, int, datetime | None]:
        """(finished, running) trials of the study, and when the oldest running one started."""
        trials = self._db(lambda: self.study.get_trials(deepcopy=False,
                                                        states=(*FINISHED, TrialState.RUNNING)))
        starts = [t.datetime_start for t in trials if t.state == TrialState.RUNNING]
        return len(trials) - len(starts), len(starts), min(filter(None, starts), default=None)

    def _db(self, call):
        return retrying(self.storage, call)


def sampler_seed(seed: int, trials: int) -> int:
    """The sampler's seed for the next trial of a study that has `trials` trials."""
    import numpy as np

    return int(np.random.SeedSequence([seed, trials]).generate_state(1)[0])


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The study's best COMPLETE trial by its own objective: the lowest final val MSE, or for a
    pareto study the lowest MSE on the Pareto front. None before the first COMPLETE trial."""
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not done:
        return None
    return min(study.best_trials if len(study.directions) > 1 else done,  # on a tie, as the
               key=lambda t: (t.values[0], -(t.user_attrs.get("max_val_perplexity") or 0.0),
                              t.number))  # table's ★: the higher perplexity, the lower number


def best_trial_info(study: optuna.Study, spec: SweepSpec) -> dict[str, Any] | None:
    best = best_trial(study)
    return None if best is None else {
        "number": best.number, "values": best.values, "params": best.params,
        "perplexity": best.user_attrs.get("max_val_perplexity")}


def outage_of(exc: BaseException) -> BaseException | None:
    """The outage past its limit behind `exc`, if there is one: the sweep says that, and not
    what some clean-up tripped on afterwards."""
    return find_cause(exc, OUTAGES)


def run(spec: SweepSpec, trials: int, storage_url: str, tracker=None, **options) -> SweepSummary:
    """`Worker(...).run()`: one worker until the study has `trials` finished trials."""
    worker = Worker(spec, trials, storage_url, tracker, **options)
    try:
        return worker.run()
    except Exception as exc:
        outage = outage_of(exc)
        if outage is not None and outage is not exc:
            raise outage from None
        raise
    finally:
        with contextlib.suppress(Exception):
            worker.storage.remove_session()

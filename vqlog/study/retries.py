"""How a trial is retried, and how a retry is judged.

A trial whose worker died (its heartbeat stopped) is failed and queued again by Optuna's
`RetryHeartbeatStaleTrialCallback`, with its params and attributes; a trial stopped by a signal
is queued the same way by its worker. The retry resumes from the latest checkpoint of the
trials it retries, and should end where the trial would have ended uninterrupted. Two things
stood in the way, and are handled here with Optuna's public API:

- **Kills and stops are counted apart.** Optuna counts every trial in a retry history against
  `max_retry`, so a trial stopped by SIGTERM twice and then killed twice was dropped, with its
  checkpoint, though a stop is never the trial's fault. `retry_killed` counts the kills alone
  (the user attribute `vqlog.kills`, which retries inherit) and stops retrying after MAX_RETRY
  of them.
- **The pruner judges a retry as its original.** Optuna's Hyperband puts a trial into a bracket
  by its number; a retry has a new number, so it was judged in another bracket, with other
  rungs: a retry of a trial that was to be pruned at 150 iterations ran to the end instead.
  `HyperbandPruner` places a retry by its original's number. The checkpoint's evaluations are
  reported to the retry (`report_history`), so pruners that read a trial's earlier values (the
  median pruner's best value so far) see what the original saw.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import time
import warnings
import weakref

import optuna
from optuna.trial import FrozenTrial, TrialState

from vqlog.bulk import gc_paused
from vqlog.config import grace_period
from vqlog.failpoints import failpoint
from vqlog.study.outage import Outage, restarted_lately, retrying

log = logging.getLogger("vqlog")

MAX_RETRY = 3  # a dead worker's trial is retried this many times (stops are not counted)
KILLS = "vqlog.kills"  # trial user attr: how many of its retry history's trials were killed
STOPPED = "vqlog.stopped"  # trial user attr: its own number, once its worker began to stop it
CLAIM = "vqlog.claim"  # trial user attr: the number of the trial a live worker runs
SET_ASIDE = ("not run: asked after this worker's study lock was lost (a database restart), or "
             "left by a stop")


def mark_stopped(trial: optuna.Trial) -> None:
    """Mark a RUNNING trial as stopped by a signal, before its worker waits for the study lock
    to queue its retry: cut off there (a second Ctrl-C), it is retried by the stale check as a
    stop, not counted as a kill. (The number, as a retry inherits its original's attributes.)"""
    with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
        trial.set_user_attr(STOPPED, trial.number)


def retry_killed(study: optuna.Study, trial: FrozenTrial) -> None:
    """Optuna's stale-trial callback: queue the dead worker's trial again, unless its retry
    history already holds MAX_RETRY kills, or its worker had queued its retry already (a worker
    stopped by a signal queues the retry, then marks the trial FAIL: killed in between). Only a
    trial marked as stopped can have its retry queued already: the study's trials are read for
    those alone, so a killed trial's check does not grow with the study."""
    failpoint("stale.retry")  # Optuna has failed the trial; its retry is not queued yet
    stopped = trial.user_attrs.get(STOPPED) == trial.number
    if stopped and has_retry(study, trial.number):
        return
    kills = int(trial.user_attrs.get(KILLS, 0)) + (not stopped)
    if kills > MAX_RETRY:
        first = original_number(trial)
        log.warning("vqlog: the worker of Seq%d died with it %d times (killed, out of memory?); it "
                    "is not retried again", (trial.number if first is None else first) + 1, kills)
        return
    counted = copy.copy(trial)
    counted.user_attrs = {**trial.user_attrs, KILLS: kills}
    queue_again(study, counted)


def set_aside(study: optuna.Study, trial: optuna.Trial) -> None:
    """FAIL, unrun, a trial this worker asked for but will not run (asked over the target after
    its study lock went with its session, or left by a stop before it started), with the reason.
    A queued row, a retry or a grid point (fixed parameters: one FAILed is not asked for again)
    is queued again first, as a stop. Safe to send again."""
    frozen = next((t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                   if t.number == trial.number), None)
    if frozen is None:  # failed meanwhile, unclaimed past the grace period, and retried
        return
    with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
        trial.set_user_attr("fail_reason", SET_ASIDE)
        if "fixed_params" in frozen.system_attrs or frozen.params:
            mark_stopped(trial)
            queue_once(study, frozen)
        study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)


def has_retry(study: optuna.Study, number: int) -> bool:
    """Whether a retry of trial `number` is in the study already (a read of every trial)."""
    return any(retry_history(t)[-1:] == [number]
               for t in study.get_trials(deepcopy=False) if t.number > number)


def queue_again(study: optuna.Study, trial: FrozenTrial) -> None:
    """Queue a retry of `trial` (its params, attributes and retry history), whatever its count.
    Optuna's callback appends to the retry history of the trial it is given, in place: given a
    copy, a call sent again after a lost reply does not add the number twice."""
    trial = copy.copy(trial)
    trial.system_attrs = copy.deepcopy(trial.system_attrs)
    with warnings.catch_warnings():  # the callback is marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=None)(study, trial)


def queue_once(study: optuna.Study, trial: FrozenTrial) -> None:
    """`queue_again`, unless a retry of `trial` is queued already: a worker's call sent again
    after a lost reply must not queue a second one (a read of every trial, once per stop)."""
    if not has_retry(study, trial.number):
        queue_again(study, trial)


def queued_retries(study: optuna.Study) -> tuple[int, int]:
    """How many retries of cut-off trials wait in the study's queue (Optuna runs the queue in
    order, so they come after the rows and grid points queued before them), and how many
    trials are RUNNING (other workers', or killed ones whose heartbeat is not stale yet)."""
    states = (optuna.trial.TrialState.WAITING, optuna.trial.TrialState.RUNNING)
    trials = study.get_trials(deepcopy=False, states=states)
    return (sum(t.state == states[0] and original_number(t) is not None for t in trials),
            sum(t.state == states[1] for t in trials))


def retry_history(trial: FrozenTrial) -> list[int]:
    """The numbers of the trials `trial` retries, the first one first (Optuna's record)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RetryHeartbeatStaleTrialCallback.retry_history(trial)


def original_number(trial: FrozenTrial) -> int | None:
    """The number of the trial that `trial` retries (the first of its retry history), or None."""
    history = retry_history(trial)
    return history[0] if history else None


def report_history(trial: optuna.Trial, records) -> None:
    """The evaluations a retry resumes after (its checkpoint's), reported as the original
    reported them. Sent again after a lost database connection, the steps that went through
    the first time are ignored by Optuna, without its warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is already reported")
        for record in records:
            trial.report(record.val_mse, record.step)


class HyperbandPruner(optuna.pruners.HyperbandPruner):
    """Optuna's Hyperband, which judges a retry in its original trial's bracket."""

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        first = original_number(trial)
        if first is not None:
            trial = copy.copy(trial)
            trial.number = first
        return super().prune(study, trial)


def fail_stale_trials(study: optuna.Study, storage: optuna.storages.BaseStorage) -> None:
    """Fail (and retry) the RUNNING trials of dead workers. Call it under the study lock.

    Optuna's own check sees the trials whose heartbeat stopped. A worker killed between creating
    its trial and its first heartbeat, or a trial created twice by a commit whose reply was lost,
    leaves a RUNNING trial without one, which nothing would ever fail, and the exact trial target
    would wait for it forever. A live worker claims its trial (user attr CLAIM) right after the
    first beat, so a RUNNING trial that this process has seen without that claim for a grace
    period is failed and retried like a stale one. (Not by its `datetime_start`: that is the
    asking host's local clock, which may be hours ahead of or behind this host's, in another
    time zone or without NTP.)

    After an outage of a PostgreSQL storage that this process saw end, long enough for a live
    trial's last beat to reach the grace period's age (no worker can beat while the database is
    down), the check waits a grace period and two beats: such an outage made every running trial
    look dead the moment it ended. After a restart of the server, which every process sees, it
    waits a grace period, two beats and the longest pause between reconnection tries.
    """
    if isinstance(storage, optuna.storages.RDBStorage) and storage.engine.name == "postgresql" \
            and (Outage.of(storage.url).may_look_dead()
                 or retrying(storage, lambda: restarted_lately(storage))):
        return  # nobody could beat while the database was down: the live workers beat again first
    # most often a worker's first read of the study, which loads every trial
    with warnings.catch_warnings(), gc_paused():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retrying(storage, lambda: optuna.storages.fail_stale_trials(study))
        retry_orphans(study, storage)
        running = retrying(storage, lambda: study.get_trials(deepcopy=False,
                                                             states=(TrialState.RUNNING,)))
    waited = unclaimed_for(study, running)
    for trial in (t for t in running if waited.get(t.number, 0.0) >= grace_period()):
        # The retry first, then the FAIL: a check cut off between the two (killed) leaves the
        # trial RUNNING and unclaimed, so the next check fails it and finds its retry queued; a
        # FAIL whose reply was lost, sent again, finds the trial failed, its retry queued. (No
        # live worker runs a trial it has not claimed for a grace period: nothing finishes it
        # meanwhile.) Sent again after a lost reply, a queued retry is found, none queued twice.
        retrying(storage, lambda: has_retry(study, trial.number) or retry_killed(study, trial))
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError, ValueError):
            retrying(storage, lambda: study.tell(trial.number, state=TrialState.FAIL))


def claimed(trial: FrozenTrial) -> bool:
    """Whether a live worker has claimed this trial (a retry inherits its original's user attrs,
    claim included, hence the number)."""
    return trial.user_attrs.get(CLAIM) == trial.number


@dataclasses.dataclass
class _Seen:
    """What this process's checks have seen of one study (its `optuna.Study` object: a study
    made anew, in a notebook say, is another object)."""

    judged: set[int] = dataclasses.field(default_factory=set)  # FAILed trials, found retried or not
    unclaimed_since: dict[int, float] = dataclasses.field(default_factory=dict)  # monotonic time


_seen: weakref.WeakKeyDictionary[optuna.Study, _Seen] = weakref.WeakKeyDictionary()


def retry_orphans(study: optuna.Study, storage: optuna.storages.BaseStorage) -> None:
    """Queue the retries that Optuna's stale check did not. It commits FAIL for every stale
    trial first, then calls the callback (`retry_killed`) for each: a process killed in between,
    or a FAIL whose reply was lost (sent again, it finds no stale trial), left a dead worker's
    trial FAILed with no retry, and its checkpoint, queued row or grid point never ran again.

    Such a trial was claimed by its worker, which did not fail it itself (a worker's FAIL
    carries `fail_reason`), unless it was stopping it (marked as stopped). Its kills are counted
    as `retry_killed` counts them; a trial without the count (retried only after stops, or by a
    vqlog before it) counts every trial it retries as a kill, so one that an older vqlog gave up
    stays given up. Each check reads the FAILed trials (Optuna's cache keeps the finished ones);
    only where one is new to this process, the study's trials are read, once."""
    seen = _seen.setdefault(study, _Seen())
    failed = retrying(storage, lambda: study.get_trials(deepcopy=False,
                                                        states=(TrialState.FAIL,)))
    new = [t for t in failed if t.number not in seen.judged]
    orphans = [t for t in new if claimed(t) and (not t.user_attrs.get("fail_reason")
                                                 or t.user_attrs.get(STOPPED) == t.number)]
    if orphans:
        trials = retrying(storage, lambda: study.get_trials(deepcopy=False))
        retried = {history[-1] for t in trials if (history := retry_history(t))}
        for trial in (t for t in orphans if t.number not in retried):
            stopped = trial.user_attrs.get(STOPPED) == trial.number
            kills = int(trial.user_attrs.get(KILLS, len(retry_history(trial)))) + (not stopped)
            if kills <= MAX_RETRY:
                counted = copy.copy(trial)
                counted.user_attrs = {**trial.user_attrs, KILLS: kills}
                sent: list[bool] = []  # sent again after a lost reply, the first is looked for

                def queue(trial=trial, counted=counted, sent=sent) -> None:
                    if not (sent and has_retry(study, trial.number)):
                        sent.append(True)
                        queue_again(study, counted)

                retrying(storage, queue)
    seen.judged.update(t.number for t in new)


def unclaimed_for(study: optuna.Study, running: list[FrozenTrial]) -> dict[int, float]:
    """How long this process has seen each unclaimed trial of `running` (the study's RUNNING
    trials, as a check read them) unclaimed, by number: 0.0 at the first sight. Only the
    unclaimed trials of the latest check are kept."""
    seen, now = _seen.setdefault(study, _Seen()), time.monotonic()
    seen.unclaimed_since = {t.number: seen.unclaimed_since.get(t.number, now)
                            for t in running if not claimed(t)}
    return {number: now - t0 for number, t0 in seen.unclaimed_since.items()}

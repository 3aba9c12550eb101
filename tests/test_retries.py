"""Retries (vqlog/study/retries.py) with real Optuna studies: kills count toward the retry
limit and stops by a signal do not, and a pruner judges a retry as it judged the trial it
retries, so that a killed trial ends where it would have ended uninterrupted.

The end-to-end kills and stops of real sweeps are in tests/test_resume.py and test_crash.py;
here the pruning decisions are taken over many kill points at once, which only an Optuna study
without training can do in seconds.
"""

from __future__ import annotations

import dataclasses
import time
from datetime import timedelta

import optuna
import pytest
from optuna.trial import TrialState

from vqlog.study.retries import (CLAIM, KILLS, MAX_RETRY, STOPPED, mark_stopped, original_number,
                                 queue_again, report_history, retry_killed)
from vqlog.study.spec import load_sweep
from vqlog.study.retries import fail_stale_trials
from vqlog.study.storage import open_storage

STEPS = range(50, 301, 50)  # eval_every 50, iteration 300


@dataclasses.dataclass
class Record:  # what report_history reads of a checkpoint's evaluations
    step: int
    val_mse: float


def test_stops_do_not_count_toward_the_retry_limit_and_kills_do(tmp_path, monkeypatch, caplog):
    """Stopped twice by SIGTERM, then killed: Optuna counted every trial of the retry history
    against the limit, so the trial was dropped at its second kill, checkpoint and all."""
    monkeypatch.setenv("VQLOG_HEARTBEAT_GRACE", "1")
    url = f"sqlite:///{tmp_path}/optuna.db"
    storage = open_storage(url)
    study = optuna.create_study(study_name="retried", storage=storage)

    def running():
        trial = study.ask()
        (frozen,) = study.get_trials(states=(TrialState.RUNNING,))
        return trial, frozen

    for _ in range(2):  # stopped by a signal: its worker queues it again
        trial, frozen = running()
        study.tell(trial, state=TrialState.FAIL)
        queue_again(study, study.trials[trial.number])
    for kill in range(1, MAX_RETRY + 2):  # killed: no heartbeat, no claim; another worker's
        trial, _ = running()              # check fails it and queues it again, to the limit,
        fail_stale_trials(study, storage)  # once it has seen it unclaimed for the grace period
        time.sleep(1.5)
        fail_stale_trials(study, storage)
        waiting = study.get_trials(states=(TrialState.WAITING,))
        if kill <= MAX_RETRY:
            (retry,) = waiting
            assert retry.user_attrs[KILLS] == kill
            assert original_number(retry) == 0 and retry.params == study.trials[0].params
        else:
            assert waiting == []  # the limit: kills only
            assert f"the worker of Seq1 died with it {kill} times" in caplog.text
    assert [t.state for t in study.trials] == [TrialState.FAIL] * (2 + MAX_RETRY + 1)
    storage.engine.dispose()


def test_a_stop_cut_off_before_its_retry_is_queued_is_still_a_stop(tmp_path, monkeypatch):
    """A second Ctrl-C while a stopping worker waited for the study lock to queue its trial's
    retry left the trial RUNNING; the stale check then retried it as a kill, one of the three
    a trial gets. Marked as stopped first, it is retried without a kill; a trial retried by
    the stale check because a worker queued its retry and was killed before the FAIL gets no
    second retry (retry_killed finds the first)."""
    monkeypatch.setenv("VQLOG_HEARTBEAT_GRACE", "1")
    storage = open_storage(f"sqlite:///{tmp_path}/optuna.db")
    study = optuna.create_study(study_name="cut", storage=storage)
    stopped, killed = study.ask(), study.ask()
    mark_stopped(stopped)  # then the worker is cut off; the other one is simply killed
    fail_stale_trials(study, storage)  # another worker's check sees them unclaimed
    time.sleep(1.5)
    fail_stale_trials(study, storage)
    retries = {original_number(t): t for t in study.get_trials(states=(TrialState.WAITING,))}
    assert retries[stopped.number].user_attrs.get(KILLS, 0) == 0
    assert retries[killed.number].user_attrs[KILLS] == 1
    # a retry queued by a stopping worker killed before its FAIL: found, none queued again
    other = optuna.create_study(study_name="queued", storage=storage)
    queued = other.ask()
    mark_stopped(queued)  # as the worker does, first
    queue_again(other, other.trials[queued.number])
    fail_stale_trials(other, storage)
    time.sleep(1.5)
    fail_stale_trials(other, storage)
    assert [(t.state, original_number(t)) for t in other.trials] == [
        (TrialState.FAIL, None), (TrialState.WAITING, queued.number)]
    storage.engine.dispose()


def curve(i: int, step: int) -> float:
    """Trial i's validation MSE at `step`: falling at a trial's own rate, with a bump, so that
    the best value so far and the latest differ and brackets' rungs split the trials."""
    level = 0.1 + ((i * 37) % 11) / 20
    return level * (1 + 100 / step) + (0.2 if (step // 50 + i) % 3 == 0 else 0.0)


def evaluate(study, trial, index: int, steps) -> tuple[str, int] | None:
    """Report trial `index`'s curve at `steps`, asking the pruner at each: the outcome, or None
    if it runs on past them."""
    for step in steps:
        trial.report(curve(index, step), step)
        if trial.should_prune():
            study.tell(trial, state=TrialState.PRUNED)
            return "PRUNED", step
    return None


def straight(pruner, n: int) -> list[tuple[str, int]]:
    study = optuna.create_study(study_name="judged", pruner=pruner)
    outcomes = []
    for i in range(n):
        trial = study.ask()
        outcome = evaluate(study, trial, i, STEPS)
        if outcome is None:
            study.tell(trial, curve(i, STEPS[-1]))
            outcome = ("COMPLETE", STEPS[-1])
        outcomes.append(outcome)
    return outcomes


def with_a_kill(pruner, killed: int, at: int, checkpoint: int) -> tuple[str, int]:
    """The same trials, trial `killed` killed after its evaluation at `at` and retried from its
    checkpoint at `checkpoint`: the retry's outcome."""
    study = optuna.create_study(study_name="judged", pruner=pruner)
    for i in range(killed):
        trial = study.ask()
        if evaluate(study, trial, i, STEPS) is None:
            study.tell(trial, curve(i, STEPS[-1]))
    trial = study.ask()
    if (outcome := evaluate(study, trial, killed, range(50, at + 1, 50))) is not None:
        return outcome  # pruned before the kill
    study.tell(trial, state=TrialState.FAIL)
    retry_killed(study, study.trials[trial.number])
    retry = study.ask()
    assert original_number(study.trials[retry.number]) == killed
    report_history(retry, [Record(s, curve(killed, s)) for s in range(50, checkpoint + 1, 50)])
    outcome = evaluate(study, retry, killed, range(checkpoint + 50, STEPS[-1] + 1, 50))
    if outcome is None:
        study.tell(retry, curve(killed, STEPS[-1]))
        outcome = ("COMPLETE", STEPS[-1])
    return outcome


@pytest.mark.parametrize("pruner", ["hyperband", "median"])
def test_a_retry_is_pruned_where_its_original_would_have_been(pruner):
    """Over every trial of a 14-trial study and every kill point: Hyperband judged a retry in the
    bracket of its own number, not its original's (a trial to be pruned at 150 ran to the end),
    and the median pruner did not see the values before the checkpoint."""
    spec = dataclasses.replace(load_sweep("smoke"), pruner=pruner, eval_every=50, iteration=300)
    n = 14
    expected = straight(spec.make_pruner(), n)
    differ = []
    for killed in range(n):
        for at in STEPS[:-1]:
            for checkpoint in range(50, at + 1, 100):
                got = with_a_kill(spec.make_pruner(), killed, at, checkpoint)
                if got != expected[killed]:
                    differ.append((killed, at, checkpoint, got, expected[killed]))
    assert differ == []
    assert {state for state, _ in expected} == {"PRUNED", "COMPLETE"}  # the pruner decided


def test_history_reported_again_after_a_lost_connection_is_ignored_quietly():
    """`report_history` runs under `retrying`: a repeat after a lost connection reported the
    steps that went through once more, and Optuna warned of each among the trial lines."""
    import warnings

    study = optuna.create_study()
    trial = study.ask()
    records = [Record(s, curve(0, s)) for s in (50, 100)]
    report_history(trial, records[:1])  # the connection was lost after the first
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report_history(trial, records)
    assert study.trials[0].intermediate_values == {50: records[0].val_mse, 100: records[1].val_mse}


def test_queueing_a_retry_again_leaves_the_trial_it_was_given_as_it_was():
    """Optuna's retry callback appends the trial's number to the retry history of the trial it
    is given, in place. A worker's call sent again after a lost reply gave it the same trial,
    and a second retry of a retry carried the number twice in its history."""
    from vqlog.study.retries import retry_history

    study = optuna.create_study()
    study.ask()
    queue_again(study, study.trials[0])
    retry = study.ask()  # trial 1 retries trial 0, and is cut off in its turn
    frozen = study.trials[retry.number]
    queue_again(study, frozen)  # its reply lost: sent again with the same trial
    assert retry_history(frozen) == [0]
    queue_again(study, frozen)
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert [retry_history(t) for t in waiting] == [[0, 1], [0, 1]]


def test_the_best_trial_breaks_a_tie_as_the_tables_star_does():
    """On an exact tie of val MSE the table's ★ goes to the higher perplexity, then the lower
    number; `best_trial` (the summary, `vqlog best`, the registered model) took the lowest
    number, so the two named different trials."""
    from vqlog.study.worker import best_trial

    study = optuna.create_study()
    for number, perplexity in enumerate((5.0, 9.0, 9.0, None)):
        trial = study.ask()
        trial.set_user_attr("max_val_perplexity", perplexity)
        study.tell(trial, 0.25)
    assert best_trial(study).number == 1


def test_an_unclaimed_trial_is_judged_by_how_long_this_host_saw_it_not_by_its_start(
        tmp_path, monkeypatch):
    """A trial's `datetime_start` is its asking host's local clock. A check on a host whose
    clock was an hour ahead (another time zone) failed a live worker's trial in the moment
    between its ask and its claim, and one whose clock was behind never failed a dead worker's
    unclaimed trial (until its own clock caught up). Judged by how long this process has seen
    it unclaimed, a live trial claimed meanwhile runs on, and a dead one is failed and retried
    after the grace period, whatever the clocks."""
    import sqlalchemy

    monkeypatch.setenv("VQLOG_HEARTBEAT_GRACE", "1")
    url = f"sqlite:///{tmp_path}/optuna.db"
    storage = open_storage(url)
    study = optuna.create_study(study_name="skewed", storage=storage)
    live, dead = study.ask(), study.ask()
    engine = sqlalchemy.create_engine(url)
    with engine.begin() as conn:  # as hosts 3 hours behind and ahead of this one wrote them
        for trial, hours in ((live, -3), (dead, 3)):
            start = study.trials[trial.number].datetime_start + timedelta(hours=hours)
            conn.execute(sqlalchemy.text("UPDATE trials SET datetime_start = :s WHERE number = :n"),
                         {"s": start.isoformat(sep=" "), "n": trial.number})
    engine.dispose()
    fail_stale_trials(study, storage)  # the first sight of both
    assert [t.state for t in study.trials] == [TrialState.RUNNING] * 2
    live.set_user_attr(CLAIM, live.number)  # its worker claims it
    time.sleep(1.5)
    fail_stale_trials(study, storage)
    trials = study.trials
    assert [t.state for t in trials[:2]] == [TrialState.RUNNING, TrialState.FAIL]
    (retry,) = trials[2:]
    assert retry.state == TrialState.WAITING and original_number(retry) == dead.number
    storage.engine.dispose()


def test_only_a_dead_workers_trial_left_without_its_retry_is_retried(tmp_path, caplog):
    """The check queues the retry Optuna's stale check did not (it commits the FAILs first, then
    queues the retries) for a trial its worker had claimed and not failed itself, and for no
    other FAILed trial: one its worker failed (a reason), one given up after its kills, one an
    older vqlog gave up (no kill count: every retry counts), one whose retry is queued. Once."""
    storage = open_storage(f"sqlite:///{tmp_path}/optuna.db")
    study = optuna.create_study(study_name="orphans", storage=storage)
    legacy = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=None)

    def failed(attrs: dict, retry=None):
        trial = study.ask()  # a queued retry first, if there is one
        trial.set_user_attr(CLAIM, trial.number)
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        study.tell(trial, state=TrialState.FAIL)
        frozen = study.trials[trial.number]
        if retry is not None:
            retry(study, frozen)
        return frozen

    orphan = failed({})  # killed; the check that failed it was killed before the retry
    failed({"fail_reason": "diverged: loss is nan at iteration 7"})
    failed({KILLS: MAX_RETRY})  # killed a fourth time: given up
    chain = [failed({}, legacy) for _ in range(MAX_RETRY)]  # an older vqlog's retries...
    given_up = failed({})  # ... and the fourth kill, which it gave up
    assert [original_number(t) for t in chain[1:] + [given_up]] == [chain[0].number] * MAX_RETRY
    stopped = failed({"fail_reason": "stopped by SIGTERM", STOPPED: study.trials[-1].number + 1},
                     queue_again)  # its worker queued the retry

    def waiting():
        return {original_number(t): t for t in study.get_trials(states=(TrialState.WAITING,))}

    assert list(waiting()) == [stopped.number]
    fail_stale_trials(study, storage)
    retries = waiting()
    assert sorted(retries) == [orphan.number, stopped.number]
    assert retries[orphan.number].user_attrs[KILLS] == 1
    assert retries[orphan.number].params == orphan.params
    assert "not retried again" not in caplog.text
    for check in (study, optuna.load_study(study_name="orphans", storage=storage)):
        fail_stale_trials(check, storage)  # again, and as another process: nothing more
        assert len(study.trials) == given_up.number + 4
    # A study made anew under the name (in the same process): its trials are judged as its own.
    optuna.delete_study(study_name="orphans", storage=storage)
    study = optuna.create_study(study_name="orphans", storage=storage)
    orphan = failed({})
    fail_stale_trials(study, storage)
    assert list(waiting()) == [orphan.number] == [0]
    storage.engine.dispose()

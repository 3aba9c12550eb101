"""One trial on one worker: its heartbeat, and the objective that trains it.

The objective is thin: suggest, fit, report for pruning, hand metrics to the tracker. It returns
an `Outcome` and leaves telling Optuna to the worker, which asked for the trial.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import threading
from dataclasses import dataclass
from typing import Any

import optuna
import torch
from optuna.trial import TrialState

from vqlog.config import Config, heartbeat_interval
from vqlog.data import DataCache
from vqlog.errors import (DivergedError, StorageOutageError, TrackingUnavailable, TrainingStopped,
                          UserError, one_line, out_of_memory)
from vqlog.failpoints import failpoint
from vqlog.study.retries import report_history
from vqlog.study.outage import retrying
from vqlog.train import fit, resolve_device
from vqlog.tracking import lineage
from vqlog.urls import mask_urls

log = logging.getLogger("vqlog")
OUTAGES = (StorageOutageError, TrackingUnavailable)  # stop the sweep: rerun once it is back
RUN_ID = lineage.RUN_ID  # trial user attr: the trial's MLflow run
LOST_REASON = ("lost: another worker heard no heartbeat from this one within the grace period "
               "and failed the trial; its retry runs later")


@dataclass
class Outcome:
    """How a trial ended here, for the worker to tell Optuna."""

    state: TrialState
    values: list[float] | None = None  # COMPLETE: the objective's values
    reason: str = ""  # FAIL: why
    lost: bool = False  # another worker failed the trial as stale meanwhile: nothing to tell
    fatal: BaseException | None = None  # an outage past its limit: the sweep stops after this
    run: Any = None  # the trial's MLflow run (tracking.runs.TrialRun), if it is tracked
    stopped_at: int | None = None  # stopped by a signal, checkpointed here: queued again


class Heartbeat:
    """Beats for one RUNNING trial every VQLOG_HEARTBEAT_INTERVAL seconds, from its own thread,
    so that other workers know its worker is alive (Optuna's stale-trial check reads the beats).

    Not Optuna's heartbeat thread: that one runs only inside `study.optimize`, which the worker
    does not use (it asks for each trial under the study lock), and it stops for good, with a
    traceback, at the first beat that fails. Here a beat that fails (a database restart) is
    skipped, and the next one, an interval later, reconnects."""

    def __init__(self, storage: optuna.storages.RDBStorage, trial_id: int):
        self.storage, self.trial_id = storage, trial_id
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat_until_stopped, daemon=True,
                                        name=f"vqlog-heartbeat-{trial_id}")
        self._warned = False

    def __enter__(self) -> Heartbeat:
        retrying(self.storage, lambda: self.storage.record_heartbeat(self.trial_id))
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _beat_until_stopped(self) -> None:
        interval = heartbeat_interval()
        while not self._stop.wait(interval):
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception as exc:  # noqa: BLE001 - never end the thread: beat again later
                with contextlib.suppress(Exception):
                    self.storage.remove_session()  # this thread's session, for a fresh connection
                if not self._warned:  # outages say so themselves (storage.Outage)
                    log.debug("vqlog: a heartbeat failed (%s); beating again in %s s",
                              one_line(exc, 200), interval)
                    self._warned = True


def worker_device(device: str) -> torch.device:
    """The device a worker trains on, as its `vqlog.worker` tag names it: a GPU by its index
    (cuda:0) also when --device cuda left the choice to torch."""
    resolved = resolve_device(device)
    if resolved.type == "cuda" and resolved.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return resolved


class Objective:
    """Runs one trial: suggest its Config, train it with `fit`, report every evaluation for
    pruning, and log it to the tracker (if any): curves, checkpoints every
    `spec.checkpoint_every` steps, and the final weights. A retry continues from the latest
    checkpoint of the trials it retries. `stop` (an Event, or None) asks for a clean stop."""

    def __init__(self, spec, cache: DataCache, tracker, device: str, seed: int | None,
                 storage: optuna.storages.BaseStorage, stop=None, cores=None):
        self.spec, self.cache, self.tracker = spec, cache, tracker
        self.device, self.seed, self.storage, self.stop = device, seed, storage, stop
        self.cores = cores  # a cores.CoreShare, or None (the threads as they are)
        self.worker = f"{socket.gethostname()}:{os.getpid()}:{worker_device(device)}"

    def __call__(self, trial: optuna.Trial, retry_history: list[int] = (),
                 queued: bool = False) -> Outcome:
        """An Outcome for every exception but KeyboardInterrupt, which leaves (the run marked
        FAIL) once the trial's run is closed. `retry_history`: the trials this one retries;
        `queued`: the trial is a row the spec queued."""
        run = None
        try:
            if self.cores is not None:  # this trial's share of the host's cores
                self.cores.apply()
            cfg = self._db(lambda: self.spec.suggest(trial, self.seed))
            data = self.cache.get(cfg)
            state = None
            if self.tracker is not None:
                state = self._resume_state(retry_history, cfg)
                tags = {"vqlog.worker": self.worker,
                        "vqlog.torch_threads": str(torch.get_num_threads())}
                if queued:
                    tags["vqlog.queued"] = "true"
                run = self.tracker.start_trial(
                    trial.number, cfg, retry_of=retry_history[0] if retry_history else None,
                    resumed_at=state["step"] if state else 0, tags=tags)
                self._db(lambda: trial.set_user_attr(RUN_ID, run.run_id))
                if state is not None or retry_history:  # its line says so, as the table does
                    # (a retry inherits its original's attrs: 0 where no checkpoint was resumed)
                    at = state["step"] if state is not None else 0
                    self._db(lambda: trial.set_user_attr("resumed_at", at))
                run.log_dataset(data, self.spec.source, self.spec.channel)
                if state is not None:
                    from vqlog.checkpoint import history

                    run.log_history(history(state))
                    if self.spec.objective != "pareto":  # Optuna prunes single objectives only
                        self._db(lambda: report_history(trial, history(state)))
            result = fit(cfg, data, on_eval=self._on_eval(trial, run, cfg.iteration),
                         device=self.device,
                         checkpoint_every=self.spec.checkpoint_every if run else 0,
                         on_checkpoint=run.log_checkpoint if run else None, resume=state,
                         should_stop=self.stop.is_set if self.stop is not None else None)
            summary = result.summary()
            for key, value in summary.items():
                self._db(lambda k=key, v=value: trial.set_user_attr(k, None if math.isnan(v) else v))
            ended = "PRUNED" if result.stopped_early else "COMPLETE"
            if run is not None:
                run.finish(ended, summary, result=result, windows=data.valid[:4])
            if result.stopped_early:
                return Outcome(TrialState.PRUNED, run=run)
            failpoint("trial.tell")  # MLflow has the result, Optuna not yet
            values = [summary["final_val_mse"]]
            if self.spec.objective == "pareto":
                ppl = summary["max_val_perplexity"]
                values.append(0.0 if math.isnan(ppl) else ppl)
            return Outcome(TrialState.COMPLETE, values=values, run=run)
        except optuna.exceptions.UpdateFinishedTrialError:
            # Another worker failed this trial as stale (this worker's heartbeat missed the grace
            # period: a long pause, an overloaded machine); its retry runs later.
            if run is not None:
                run.finish("FAIL", reason=LOST_REASON)
            return Outcome(TrialState.FAIL, reason=LOST_REASON, lost=True, run=run)
        except BaseException as exc:
            reason = describe(exc, self.stop)
            fatal = exc if isinstance(exc, OUTAGES) else None
            try:
                if run is not None and not isinstance(exc, TrackingUnavailable):
                    stopped = getattr(exc, "iteration", None)  # stopped or diverged there
                    run.finish("FAIL", None if stopped is None else {"iterations_run": stopped},
                               reason=reason)  # (with the tracking down it stays RUNNING and
                    # the rerun's reconcile closes it)
                elif run is not None:
                    run.abandon()
                if not isinstance(exc, StorageOutageError):
                    self._db(lambda: trial.set_user_attr("fail_reason", reason))
            except OUTAGES as outage:
                fatal = fatal or outage
            if isinstance(exc, KeyboardInterrupt):
                raise
            stopped_at = exc.iteration if isinstance(exc, TrainingStopped) else None
            return Outcome(TrialState.FAIL, reason=reason, fatal=fatal, run=run,
                           stopped_at=stopped_at)

    def _resume_state(self, retry_history: list[int], cfg: Config) -> dict | None:
        """The latest checkpoint of the trials this one retries, if it is for the same config."""
        if not retry_history:
            return None
        try:
            state = self.tracker.latest_checkpoint(list(reversed(retry_history)))
        except UserError as exc:  # not a training state, or one this version cannot read
            log.warning("vqlog: cannot resume from the checkpoint of trial %s (%s); the retry "
                        "starts over", retry_history[-1], exc)
            return None
        if state is not None and Config.from_mapping(state["config"]) != cfg:
            log.warning("vqlog: the checkpoint of trial %s is for another configuration; the "
                        "retry starts over", retry_history[-1])
            return None
        return state

    def _on_eval(self, trial: optuna.Trial, run, last: int):
        """Each evaluation logged and reported; pruned as Optuna's pruner says, except the last
        (at `last`, the trial's budget), after which there is nothing left to save: pruned there,
        a trial that had trained to its end was kept without its weights."""
        multi = self.spec.objective == "pareto"

        def on_eval(record) -> bool:
            failpoint("trial.eval")
            if run is not None:
                run.log_eval(record)
            if multi:  # Optuna prunes single-objective studies only
                return False
            self._db(lambda: trial.report(record.val_mse, record.step))
            return record.step < last and self._db(trial.should_prune)

        return on_eval

    def _db(self, call):
        return retrying(self.storage, call)


def describe(exc: BaseException, stop=None) -> str:
    """The reason a trial failed, as its FAIL line and the run's `vqlog.fail_reason` say it."""
    if isinstance(exc, TrainingStopped):
        return f"stopped ({getattr(stop, 'signal', None) or 'asked to'}); resumes on rerun"
    if isinstance(exc, DivergedError):
        return str(exc)
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted (Ctrl-C)"
    if (oom := out_of_memory(exc)) is not None:
        return f"{oom}: the trial's batch, window, d_model or codebook is too large here"
    # A library's message may quote a URL with its password (MLflow's requests errors do); the
    # reason goes to the FAIL line, Optuna's fail_reason and the run's vqlog.fail_reason tag.
    return mask_urls(one_line(f"{type(exc).__name__}: {exc}"))

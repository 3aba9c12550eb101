"""`run(spec, ...)`: one sweep worker. Every worker runs the same loop against the same storage;
Optuna's RDB storage is the distributed engine, vqlog adds only an exact trial target.

`--trials N` counts finished trials (COMPLETE + PRUNED) across every worker. To stop at exactly N,
a worker decides and creates its next trial under a storage-wide lock (a PostgreSQL advisory lock,
or a file lock beside an SQLite file): "count, then ask" is atomic, and the objective releases the
lock as soon as its trial exists.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import optuna
from optuna.trial import TrialState

from vqlog import storage as storage_mod
from vqlog.config import Config
from vqlog.data import Splits, prepare
from vqlog.errors import DivergedError, UserError, VqlogError
from vqlog.failpoints import failpoint
from vqlog.retry import TrackingUnavailable
from vqlog.spec import SweepSpec
from vqlog.train import fit

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
    interrupted: bool = False
    timed_out: bool = False
    best: dict[str, Any] | None = None
    table_path: str | None = None
    messages: list[str] = field(default_factory=list)


def count_states(study: optuna.Study) -> dict[TrialState, int]:
    counts = {s: 0 for s in TrialState}
    for t in study.get_trials(deepcopy=False):
        counts[t.state] += 1
    return counts


def make_sampler(spec: SweepSpec, seed: int | None) -> optuna.samplers.BaseSampler:
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if spec.sampler == "grid":
        return optuna.samplers.GridSampler(spec.grid(), seed=seed)
    if spec.objective == "pareto":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True)
    # Enqueued rows and the first random trials seed TPE's density estimates.
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=8)


def make_pruner(spec: SweepSpec) -> optuna.pruners.BasePruner:
    if spec.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=spec.eval_every, max_resource=spec.iteration, reduction_factor=3
        )
    if spec.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=spec.eval_every)
    return optuna.pruners.NopPruner()


class DataCache:
    """Windows depend on a few config keys only; prepare each variant once per worker."""

    KEYS = ("window", "stride", "resample_hz", "standardize", "seed")  # seed: synthetic data

    def __init__(self, source: str, sample_rate: float | None):
        self.source, self.sample_rate = source, sample_rate
        self._cache: dict[tuple, Splits] = {}

    def get(self, cfg: Config) -> Splits:
        key = tuple(getattr(cfg, k) for k in self.KEYS)
        if key not in self._cache:
            self._cache[key] = prepare(self.source, cfg, sample_rate=self.sample_rate)
        return self._cache[key]


def check_data(spec: SweepSpec, cache: DataCache, seed: int | None) -> None:
    """Load the data for the base config and every categorical window before any study exists."""
    base = spec.base_config(seed)
    cache.get(base)
    for p in spec.space:
        if p.name in DataCache.KEYS and p.kind == "categorical":
            for choice in p.choices:
                cache.get(Config.from_mapping({p.name: choice}, base=base))


def quiet_optuna() -> None:
    """vqlog prints its own line per trial; Optuna's INFO lines, its WARNING with the whole
    traceback of every failed trial, and the ExperimentalWarnings of the heartbeat API it
    recommends would drown them (the failure's reason is in vqlog's line and the trial's
    `fail_reason`)."""
    import warnings

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def run(
    spec: SweepSpec,
    trials: int,
    storage_url: str,
    tracker=None,
    device: str = "cpu",
    timeout: float | None = None,
    seed: int | None = None,
    out: Callable[[str], None] = print,
) -> SweepSummary:
    """Run trials until the study has `trials` finished ones. Returns what happened here."""
    quiet_optuna()
    cache = DataCache(spec.source, spec.sample_rate)
    check_data(spec, cache, seed)
    if tracker is not None:
        tracker.check_experiment(spec.name)  # before the study exists
    storage = storage_mod.open_storage(storage_url)
    lock = storage_mod.StudyLock(storage_url, spec.name)
    with lock:
        study = optuna.create_study(
            storage=storage,
            study_name=spec.name,
            directions=spec.directions,
            sampler=make_sampler(spec, seed),
            pruner=make_pruner(spec),
            load_if_exists=True,
        )
        _check_directions(study, spec)
        if spec.enqueue and not study.user_attrs.get("vqlog.enqueued"):
            for row in spec.enqueue:
                study.enqueue_trial(row, skip_if_exists=True)
            study.set_user_attr("vqlog.enqueued", True)
        # Killed workers' trials first, so start_study's reconcile closes their MLflow runs now.
        storage_mod.fail_stale_trials(study)
        if tracker is not None:
            # Under the lock: two workers starting together would each create a study run.
            tracker.start_study(study, spec)

    summary = SweepSummary(study=spec.name, finished=0, target=trials)
    progress = _TrialProgress(trials, out)
    fails_in_a_row = 0
    started = time.monotonic()
    objective = _Objective(spec, cache, tracker, device, seed, lock)

    def after_trial(study: optuna.Study, frozen: optuna.trial.FrozenTrial) -> None:
        nonlocal fails_in_a_row
        summary.ran_here += 1
        fails_in_a_row = fails_in_a_row + 1 if frozen.state == TrialState.FAIL else 0
        summary.failed_here += frozen.state == TrialState.FAIL
        progress.trial_line(study, frozen)
        if tracker is not None:
            summary.table_path = tracker.after_trial(study)

    def after_lost_trial(frozen: optuna.trial.FrozenTrial) -> None:
        summary.ran_here += 1
        summary.failed_here += 1
        if tracker is not None:
            summary.table_path = tracker.after_trial(study)
        progress.line(f"Seq{frozen.number + 1:<4} FAIL      {LOST_REASON}")

    try:
        while True:
            with lock:
                storage_mod.fail_stale_trials(study)  # a killed worker's trial: FAIL + retry
                counts = count_states(study)
                finished = sum(counts[s] for s in FINISHED)
                progress.update(finished)
                if finished >= trials:
                    break
                if timeout is not None and time.monotonic() - started > timeout:
                    summary.timed_out = True
                    break
                if fails_in_a_row >= MAX_FAILS_IN_A_ROW:
                    raise SweepError(
                        f"{fails_in_a_row} trials in a row failed here (last: "
                        f"{objective.last_fail_reason}); check the spec and data, then rerun"
                    )
                if finished + counts[TrialState.RUNNING] >= trials:
                    lock.release()  # others are running the last trials: wait for them
                    time.sleep(POLL_SECONDS)
                    continue
                objective.trial = objective.run = None
                try:
                    study.optimize(objective, n_trials=1, catch=(Exception,), callbacks=[after_trial])
                except Exception as exc:
                    outage = _cause(exc, (storage_mod.StorageOutageError, TrackingUnavailable))
                    if outage is not None:
                        # The database or the tracking server is gone for longer than its limit:
                        # say that, not what Optuna's clean-up tripped on afterwards.
                        raise outage from None
                    lost = objective.lost_trial(study)
                    if lost is None:
                        raise
                    after_lost_trial(lost)
    except KeyboardInterrupt:
        summary.interrupted = True
    finally:
        progress.close()
    counts = count_states(study)
    summary.finished = sum(counts[s] for s in FINISHED)
    summary.best = best_trial_info(study, spec)
    if tracker is not None:
        summary.table_path = tracker.finish_study(study)
    return summary


class SweepError(VqlogError):
    """The sweep cannot go on (not the user's input): exit 1."""


def _check_directions(study: optuna.Study, spec: SweepSpec) -> None:
    have = [d.name.lower() for d in study.directions]
    if have != spec.directions:
        raise UserError(
            f"study '{spec.name}' already exists with directions {have}, but this spec's objective "
            f"'{spec.objective}' needs {spec.directions}; use another --study name"
        )


LOST_REASON = ("lost: another worker heard no heartbeat from this one within the grace period "
               "and failed the trial; its retry runs later")


class _Objective:
    """Thin: suggest, fit, report for pruning, hand metrics to the tracker."""

    def __init__(self, spec, cache, tracker, device, seed, lock):
        self.spec, self.cache, self.tracker = spec, cache, tracker
        self.device, self.seed, self.lock = device, seed, lock
        self.last_fail_reason = ""
        self.trial = self.run = None  # the trial running here, and its MLflow run

    def __call__(self, trial: optuna.Trial):
        self.lock.release()  # the trial exists now; let other workers ask for theirs
        self.trial = trial
        run = None
        try:
            cfg = self.spec.suggest(trial, self.seed)
            if self.tracker is not None:
                run = self.run = self.tracker.start_trial(trial.number, cfg)
            multi = self.spec.objective == "pareto"

            def on_eval(record) -> bool:
                failpoint("trial.eval")
                if run is not None:
                    run.log_eval(record)
                if multi:
                    return False
                trial.report(record.val_mse, record.step)
                return trial.should_prune()

            data = self.cache.get(cfg)
            result = fit(cfg, data, on_eval=on_eval, device=self.device)
            summary = result.summary()
            for key, value in summary.items():
                trial.set_user_attr(key, None if math.isnan(value) else value)
            if result.stopped_early:
                if run is not None:
                    run.finish("PRUNED", summary, result=result, windows=data.valid[:4])
                raise optuna.TrialPruned(f"pruned at iteration {result.iterations_run}")
            if run is not None:
                run.finish("COMPLETE", summary, result=result, windows=data.valid[:4])
            failpoint("trial.tell")  # MLflow has the result, Optuna not yet
            if multi:
                return summary["final_val_mse"], _or_zero(summary["max_val_perplexity"])
            return summary["final_val_mse"]
        except optuna.TrialPruned:
            raise
        except BaseException as exc:
            reason = _reason(exc)
            self.last_fail_reason = reason
            try:
                if run is not None:
                    run.finish("FAIL", reason=reason)
            finally:
                with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
                    trial.set_user_attr("fail_reason", reason)  # unless already failed as lost
            raise

    def lost_trial(self, study: optuna.Study) -> optuna.trial.FrozenTrial | None:
        """The trial that just ran here, if another worker failed it as stale meanwhile (this
        worker's heartbeat missed the grace period: a long pause, an overloaded machine). Optuna
        then refuses to record this worker's result and raises; the trial's retry runs later.
        Its MLflow run is marked failed like the trial."""
        if self.trial is None:  # the exception came before a trial existed (ask, storage)
            return None
        frozen = study._storage.get_trial(self.trial._trial_id)
        if frozen.state != TrialState.FAIL or "fail_reason" in frozen.user_attrs:
            return None  # not failed, or failed here (and the error is another one)
        if self.run is not None:
            self.run.finish("FAIL", reason=LOST_REASON)
        return frozen


def _cause(exc: BaseException, kinds: tuple[type, ...]) -> BaseException | None:
    """`exc` or the first exception of `kinds` in its cause/context chain."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, kinds):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _or_zero(x: float) -> float:
    return 0.0 if math.isnan(x) else x


def _reason(exc: BaseException) -> str:
    if isinstance(exc, DivergedError):
        return str(exc)
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted (Ctrl-C)"
    return f"{type(exc).__name__}: {exc}"


def best_trial_info(study: optuna.Study, spec: SweepSpec) -> dict[str, Any] | None:
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    if not done:
        return None
    if spec.objective == "pareto":
        best = min(study.best_trials, key=lambda t: t.values[0])
    else:
        best = min(done, key=lambda t: t.value)
    return {
        "number": best.number,
        "values": best.values,
        "params": best.params,
        "perplexity": best.user_attrs.get("max_val_perplexity"),
    }


class _TrialProgress:
    """A tqdm bar over finished trials on a terminal; plain lines otherwise."""

    def __init__(self, total: int, out: Callable[[str], None]):
        self.out, self.total = out, total
        self.bar = None
        if sys.stderr.isatty() and os.environ.get("CI") is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="trials", unit="trial", dynamic_ncols=True)

    def update(self, finished: int) -> None:
        if self.bar is not None:
            self.bar.n = min(finished, self.total)
            self.bar.refresh()

    def trial_line(self, study: optuna.Study, t: optuna.trial.FrozenTrial) -> None:
        a = t.user_attrs
        if t.state == TrialState.FAIL:
            what = f"FAIL      {a.get('fail_reason', '')}"
        else:
            mse = a.get("final_val_mse")
            ppl = a.get("max_val_perplexity")
            what = (f"{t.state.name:<9} val mse {mse:.4f}" if mse is not None else t.state.name)
            if ppl is not None:
                what += f"  perplexity max {ppl:.1f}"
            what += f"  ({int(a.get('iterations_run', 0))} it, {a.get('train_seconds', 0):.0f} s)"
        best = _best_so_far(study)
        self.line(f"Seq{t.number + 1:<4} {what}" + (f"  | best {best}" if best else ""))
        if self.bar is not None:
            self.bar.set_postfix_str(best or "", refresh=True)

    def line(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            self.out(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _best_so_far(study: optuna.Study) -> str:
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not done:
        return ""
    best = min(done, key=lambda t: t.values[0])
    return f"{best.values[0]:.4f} (Seq{best.number + 1})"

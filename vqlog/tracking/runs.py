"""MLflow runs: a parent run per study, a child run per trial (README, "MLflow layout").

Metrics go in one `log_batch` request per evaluation interval, not one request per value
(mlflow#5269 describes how slow per-value logging is). The tracker takes its URI as a parameter
and never touches MLflow's global state.
"""

from __future__ import annotations

import logging
import math
import re
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import optuna
from optuna.trial import TrialState

from vqlog.bulk import gc_paused
from vqlog.errors import TrackingUnavailable, UserError, one_line
from vqlog.files import write_text
from vqlog.tracking import artifacts, lineage, table
from vqlog.tracking.trial_run import STATUS, TrialRun, settle
from vqlog.tracking.rows import TRIAL_ROLE, RowCache, run_name, search_all
from vqlog.tracking.client import open_client, resolve_tracking_uri, store_uri
from vqlog.urls import mask, mask_urls, sqlite_path

log = logging.getLogger("vqlog")

OPTUNA_STATE = {TrialState.COMPLETE: "COMPLETE", TrialState.PRUNED: "PRUNED", TrialState.FAIL: "FAIL"}
TABLE_SECONDS = 10.0  # a worker refreshes the table at most this often (and at the end)
STUDY_PLOTS_SECONDS = 60.0  # and Optuna's study plots, which read every trial, at most this often
STUDY_ROLE = "tags.`vqlog.role` = 'study'"


def find_study_run(client, experiment_id: str, run: bool = False):
    """The id of the experiment's study run (the first, should two workers ever make one each),
    or the run itself; None if there is none."""
    runs = client.search_runs([experiment_id], filter_string=STUDY_ROLE, max_results=1,
                              order_by=["attributes.start_time ASC"])
    return (runs[0] if run else runs[0].info.run_id) if runs else None


def study_run(client, study: str) -> str | None:
    """The id of the study run of study `study`, or None."""
    exp = client.get_experiment_by_name(study)
    return None if exp is None else find_study_run(client, exp.experiment_id)


def study_names(client) -> list[str]:
    """The vqlog studies this store holds (experiments with a study run)."""
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string=STUDY_ROLE)
    return sorted({r.data.tags.get("optuna.study") for r in runs} - {None})


def _artifact_location(uri: str, study: str) -> str | None:
    """For the embedded SQLite store, artifacts live in ./mlartifacts beside the database, where
    `mlflow ui` started in the same folder finds them."""
    path = sqlite_path(uri)
    if path is None:
        return None
    root = path.resolve().parent / "mlartifacts"
    return (root / re.sub(r"[^A-Za-z0-9_.-]", "_", study)).as_uri()


class Tracker:
    """One per sweep worker. `start_study` once, `start_trial` per trial, `after_trial` after each."""

    def __init__(self, tracking_uri: str | None = None, table_dir: str | Path = "results",
                 lang: str = "en", table_seconds: float = TABLE_SECONDS,
                 plots_seconds: float = STUDY_PLOTS_SECONDS):
        self.given_uri = resolve_tracking_uri(tracking_uri)  # as the user gave it, for messages
        self.uri = store_uri(tracking_uri)
        self._client = None  # made on first use: a bad input found later leaves no mlflow.db
        self.table_dir = Path(table_dir)
        self.lang = lang
        self.experiment_id: str | None = None
        self.parent_id: str | None = None
        self.study_name = ""
        self._rows: RowCache | None = None  # the table's rows, fetched incrementally
        self._rendered = table.RenderCache()  # and rendered once each
        self._failed_seen: set[int] = set()  # FAIL trials whose runs reconcile has looked at
        self._marked: str | None = None  # the study run this tracker marked as holding a table
        self._table_at = self._plots_at = -math.inf  # monotonic times of the last refreshes
        self.table_seconds = table_seconds  # after_trial's throttles (0: the table every trial)
        self.plots_seconds = self._plots_every = plots_seconds
        self._db = _direct  # how reads of the Optuna study are sent (start_study)
        self._kept_checkpoints = False  # drop_checkpoints failed (warned once)

    @property
    def client(self):
        if self._client is None:
            self._client = open_client(self.uri)
        return self._client

    # ------------------------------------------------------------------------------ study level

    def check_experiment(self, name: str) -> None:
        """Before the Optuna study is created: a deleted experiment of that name, or one this
        user may not read on a tracking server, is bad input.
        An SQLite store that does not exist yet has none (and is not created here)."""
        from mlflow.exceptions import MlflowException

        path = sqlite_path(self.uri)
        if path is not None and not path.is_file():
            return
        try:
            exp = self.client.get_experiment_by_name(name)
        except MlflowException as exc:  # a tracking server's user without a permission on it
            if exc.get_http_status_code() != 403:
                raise
            raise UserError(f"this user may not read MLflow experiment '{name}' on "
                            f"{mask(self.uri)} (HTTP 403): ask the server's admin for EDIT "
                            "permission on it, or log in as a user who has it") from None
        if exp is not None and exp.lifecycle_stage == "deleted":
            raise UserError(_deleted(name))

    def start_study(self, study: optuna.Study, spec, db: Callable | None = None) -> None:
        """The experiment and its parent run, created once (any worker may be first). `db(call)`
        sends this tracker's reads of the Optuna study from then on: the worker's
        `vqlog.study.outage.retrying`, so that they ride out a database restart like its own."""
        self._db = db or _direct
        self.study_name = study.study_name
        self.experiment_id = self._experiment(study.study_name, spec.description)
        self._started = (study, spec)
        self.parent_id = self._parent_run(study, spec)
        self.reconcile(study, everything=True)
        # the first study plots a minute in (a shorter sweep draws them once, at its end)
        self._plots_at = time.monotonic()

    def _experiment(self, name: str, description: str) -> str:
        """The experiment named after the study; the spec's description is its description in
        the UI."""
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                raise UserError(_deleted(name))
            for key, value in lineage.EXPERIMENT_KIND.items():  # one made by an older vqlog
                if exp.tags.get(key) != value:
                    self.client.set_experiment_tag(exp.experiment_id, key, value)
            return exp.experiment_id
        tags = dict(lineage.EXPERIMENT_KIND)
        if description:
            tags["mlflow.note.content"] = description
        try:
            return self.client.create_experiment(
                name, artifact_location=_artifact_location(self.uri, name), tags=tags)
        except Exception:  # noqa: BLE001 - another worker created it first (mlflow#4123)
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    def _parent_run(self, study: optuna.Study, spec) -> str:
        uid = self._db(lambda: study.user_attrs.get(lineage.STUDY_UID))  # open_study's
        found = find_study_run(self.client, self.experiment_id)
        if found is not None:
            theirs = self.client.get_run(found).data.tags.get(lineage.STUDY_UID)
            if uid and theirs != uid:  # an older vqlog's study run, or one without trial runs
                if theirs and self.client.search_runs([self.experiment_id], TRIAL_ROLE,
                                                      max_results=1):
                    raise UserError(f"MLflow experiment '{study.study_name}' holds the trial "
                                    "runs of another Optuna study of that name")  # raced past
                self.client.set_tag(found, lineage.STUDY_UID, uid)  # check_owner's check
            return found
        run = self.client.call(  # one whose reply was lost is found: not made twice
            "create_run", self.experiment_id, found=lambda client: find_study_run(
                client, self.experiment_id, run=True),
            run_name=study.study_name,
            tags={
                "vqlog.role": "study", "optuna.study": study.study_name,
                table.LANG_TAG: self.lang,  # its table's, which `vqlog table` follows
                **({lineage.STUDY_UID: uid} if uid else {}),
                "vqlog.spec": Path(spec.path).name if spec.path else "",
                "mlflow.note.content": f"Study {study.study_name}: the experiment table appears "
                "here after the first finished trial.",
            },
        )
        params = {
            "objective": spec.objective, "sampler": spec.sampler, "pruner": spec.pruner,
            "data": spec.source, "budget.iteration": spec.iteration,
            "budget.eval_every": spec.eval_every, "budget.checkpoint_every": spec.checkpoint_every,
        }
        if spec.channel is not None:
            params["data.channel"] = spec.channel
        params.update({f"fixed.{k}": v for k, v in spec.fixed})
        params.update({f"space.{p.name}": p.text() for p in spec.space})
        self._log_params(run.info.run_id, params)
        # The parent run holds artifacts and the table; it is never left RUNNING.
        self.client.set_terminated(run.info.run_id, "FINISHED")
        return run.info.run_id

    def after_trial(self, study: optuna.Study, table_lock=None) -> str | None:
        """After each trial: reconcile the runs that can be out of step, and, at most every
        `table_seconds` and only while this worker holds `table_lock` (one writer per study at a
        time; a lock it cannot take at once is skipped), the table; Optuna's study plots at
        most every `plots_seconds`, and never more than a tenth of the time. Only the runs
        changed since the last look are read and rendered; what grows with the study is
        joining and writing the table's lines. Returns the table's path when it was written."""
        self.reconcile(study)
        now = time.monotonic()
        if now - self._table_at < self.table_seconds:
            return None
        if table_lock is not None and not table_lock.try_acquire():
            return None
        try:
            path = self.refresh_table()
            self._table_at = now
            if now - self._plots_at >= self._plots_every:
                self.refresh_study_plots(study)
                self._plots_at = now
                # Optuna's plots read every trial (importances fit a forest): never more than
                # a tenth of the worker's time, however large the study grows
                self._plots_every = max(self.plots_seconds, 10 * (time.monotonic() - now))
        finally:
            if table_lock is not None:
                table_lock.release()
        return path

    def finish_study(self, study: optuna.Study) -> str:
        self.reconcile(study)
        path = self.refresh_table()
        self.refresh_study_plots(study)
        return path

    def refresh_table(self) -> str:
        if self._rows is None or self._rows.study != self.study_name:
            self._rows = RowCache(self.client, self.study_name)
        rows = self._rows.rows()
        path = table.table_path(self.table_dir, self.study_name)
        text = table.render_table(rows, lang=self.lang, title=self.study_name,
                                  cache=self._rendered)
        write_text(path, text, crash_point="table.write")
        try:
            table.publish_table(self.client, self.parent_id, rows, self.study_name, self.lang, text,
                          self._rendered, mark=self._marked != self.parent_id)
        except Exception as exc:  # noqa: BLE001 - MLflow's, when the study run was deleted in
            if isinstance(exc, TrackingUnavailable) or self._study_run_kept():  # the UI: the
                raise  # table then goes to a new study run (or the one another worker made)
            self.parent_id = self._parent_run(*self._started)
            table.publish_table(self.client, self.parent_id, rows, self.study_name, self.lang, text,
                          self._rendered)
        self._marked = self.parent_id
        self._rendered.keep(rows)
        return str(path)

    def refresh_study_plots(self, study: optuna.Study) -> None:
        from vqlog.tracking import plots  # matplotlib: only where something is drawn

        with gc_paused():  # the plots read every trial
            figures = self._db(lambda: plots.study_figures(study))
        try:
            for name, fig in figures:
                self.client.log_figure(self.parent_id, fig, f"optuna/{name}.png")
        finally:
            for _, fig in figures:
                plots.close(fig)

    def reconcile(self, study: optuna.Study, everything: bool = False) -> None:
        """Give trial runs the state Optuna settled on, where a killed worker left them apart:
        a run left RUNNING, or a run finished in MLflow whose worker died before Optuna stored
        the result (Optuna fails that trial and retries it). Only runs that can be out of step
        are read: the RUNNING ones, and those of trials that failed since the last look;
        `everything` (a worker's start) reads every trial run once."""
        with gc_paused():  # a worker's first read of the study loads every trial
            trials = {t.number: t for t in self._db(lambda: study.get_trials(deepcopy=False))}
        if everything:
            looked_at = int(time.time() * 1000)
            runs = search_all(self.client, self.experiment_id, TRIAL_ROLE)
            if self._rows is None or self._rows.study != self.study_name:
                # the table's first look; the runs changed below get new end times, which its
                # next look reads again
                self._rows = RowCache(self.client, self.study_name, self.experiment_id)
                self._rows.seed(runs, looked_at)
        else:
            # the status alone (a tag filter joins every run's tags in the store's query);
            # the role is checked below
            runs = search_all(self.client, self.experiment_id, "attributes.status = 'RUNNING'")
            failed = [n for n, t in trials.items()
                      if t.state == TrialState.FAIL and n not in self._failed_seen]
            for number in failed:
                runs += artifacts.trial_runs(self.client, self.experiment_id, number)
        self._failed_seen.update(n for n, t in trials.items() if t.state == TrialState.FAIL)
        for run in runs:
            if run.data.tags.get("vqlog.role") != "trial":
                continue
            trial = trials.get(int(run.data.tags.get("optuna.trial_number", -1)))
            if trial is None or trial.state in (TrialState.RUNNING, TrialState.WAITING):
                continue
            name = OPTUNA_STATE.get(trial.state, "FAIL")
            if run.info.status == STATUS[name] and run.data.tags.get("optuna.state") == name:
                continue
            # The worker's own reason when it got to record one (a tracking outage), else it
            # was killed before it could.
            reason = trial.user_attrs.get("fail_reason") or (
                "worker lost: its heartbeat stopped (killed or crashed)")
            settle(self.client, run, name, reason if trial.state == TrialState.FAIL else None)

    # ------------------------------------------------------------------------------ trial level

    def start_trial(self, number: int, cfg, retry_of: int | None = None, resumed_at: int = 0,
                    tags: dict[str, str] | None = None) -> TrialRun:
        """The trial's run. A retry's carries `vqlog.retry_of` (the original trial's number)
        and, when it continues from a checkpoint, `vqlog.resumed_at` (the iteration); `tags`
        are the worker's (vqlog.worker, vqlog.torch_threads, vqlog.queued)."""
        tags = {
            **(tags or {}),
            "mlflow.parentRunId": self.parent_id,
            "vqlog.role": "trial",
            "optuna.study": self.study_name,
            "optuna.trial_number": str(number),
            "optuna.state": "RUNNING",
        }
        if retry_of is not None:
            tags["vqlog.retry_of"] = str(retry_of)
        if resumed_at:
            tags["vqlog.resumed_at"] = str(resumed_at)
        tags.update(lineage.run_context_tags())
        run = self.client.call(  # a trial has one run: one whose reply was lost is found
            "create_run", self.experiment_id, run_name=run_name(number), tags=tags,
            found=lambda client: next((r for r in artifacts.trial_runs(
                client, self.experiment_id, number) if r.data.tags.get("mlflow.parentRunId")
                == self.parent_id), None))  # (not an adopted older study's run of that number)
        self._log_params(run.info.run_id, cfg.to_params())
        return TrialRun(self.client, run.info.run_id, cfg,
                        monitor=lineage.system_metrics(run.info.run_id, self.uri))

    def ui_url(self) -> str:
        """The experiment's training view in the MLflow UI."""
        return lineage.ui_link(self.uri, self.experiment_id)

    def latest_checkpoint(self, numbers: list[int]) -> dict | None:
        """The most advanced training state the runs of trials `numbers` left (on the CPU:
        resuming puts it on the trial's device), or None."""
        return artifacts.latest_checkpoint(self.client, self.experiment_id, numbers)

    def drop_checkpoints(self, run_id: str, retried: Iterable[int] = ()) -> None:
        """Once Optuna holds a trial as COMPLETE or PRUNED nothing resumes it: delete its run's
        checkpoint, and those of the trials it retried (their retry is over). At thousands of
        trials the dead checkpoints would be most of the artifact store (3x a model file
        each). A store that refuses keeps them, with one warning per worker."""
        try:
            runs = [self.client.get_run(run_id)]
            for number in retried:
                runs += artifacts.trial_runs(self.client, self.experiment_id, number)
            for run in runs:
                artifacts.drop_checkpoint(self.client, run)
        except Exception as exc:  # noqa: BLE001 - a checkpoint left is only disk space
            if not self._kept_checkpoints:
                log.warning("vqlog: finished trials keep their checkpoints here: deleting "
                            "checkpoint/ of run %s failed (%s)", run_id, mask_urls(one_line(exc, 300)))
            self._kept_checkpoints = True

    def register_best(self, number: int, run_id: str | None = None) -> bool:
        """Alias `best` of the model `<study>` -> trial `number`'s weights (see artifacts).
        `run_id` is the trial's run when the worker knows it (its `mlflow.run_id` user attr);
        without it, or when this store has no such run, the trial's COMPLETE run is searched for."""
        from mlflow.exceptions import MlflowException

        if run_id is not None:
            try:
                return artifacts.register_best(self.client, self.study_name, run_id, number)
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
        runs = [r for r in artifacts.trial_runs(self.client, self.experiment_id, number)
                if r.data.tags.get("optuna.state") == "COMPLETE"]
        if not runs:
            return False
        return artifacts.register_best(self.client, self.study_name, runs[0].info.run_id, number)

    def outage_note(self) -> str | None:
        """A line for the sweep's summary when outages were ridden out, else None."""
        if self._client is None or not self._client.outages:
            return None
        return (f"tracking: {self._client.outages} outage(s) of {self._client.describe} ridden out; "
                "no metric lost")

    def _study_run_kept(self) -> bool:
        """Whether the study run is still there (not deleted in the UI, nor gone to `mlflow gc`)."""
        try:
            return self.client.get_run(self.parent_id).info.lifecycle_stage == "active"
        except Exception:  # noqa: BLE001 - MLflow's "not found" (an outage: the next call says)
            return False

    def _log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        self.client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])


def _deleted(name: str) -> str:
    return (f"MLflow experiment '{name}' is deleted; restore it in the UI "
            "(or `mlflow experiments restore`) or use another --study name")


def _direct(call: Callable[[], Any]) -> Any:
    return call()

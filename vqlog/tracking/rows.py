"""Trial rows as the experiment table needs them, read from the study's MLflow trial runs, and
the log's run names (`Seq<n>`, for trial n-1)."""

from __future__ import annotations

import contextlib
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable

from vqlog.bulk import gc_paused
from vqlog.errors import UserError

if TYPE_CHECKING:  # mlflow is slow to import; only the MLflow-facing functions need it
    from mlflow import MlflowClient
    from mlflow.entities import Run

# MLflow run status -> Optuna state, for a trial run that lacks its optuna.state tag.
TRIAL_ROLE = "tags.`vqlog.role` = 'trial'"
_STATUS_TO_STATE = {"FINISHED": "COMPLETE", "KILLED": "PRUNED", "FAILED": "FAIL",
                    "RUNNING": "RUNNING", "SCHEDULED": "RUNNING"}

_RUN_NAME = re.compile(r"Seq(\d+)")


def run_name(number: int) -> str:
    """The log's name for Optuna trial `number`: Seq1 is trial 0 (the MLflow run name too)."""
    return f"Seq{number + 1}"


def number_of(name: str | None) -> int | None:
    """The trial number a `run_name` stands for, or None."""
    match = _RUN_NAME.fullmatch(name or "")
    return int(match.group(1)) - 1 if match else None


@dataclass(frozen=True)
class TrialRow:
    """One trial as the table needs it: Optuna number and state, params as logged, summary metrics."""

    number: int
    state: str
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    fail_reason: str | None = None
    retry_of: int | None = None  # the original trial this one retries (tag vqlog.retry_of)
    resumed_at: int | None = None  # the iteration it continued from (tag vqlog.resumed_at)
    run_id: str | None = None  # the MLflow run the row was read from
    queued: bool = False  # a row the spec queued (tag vqlog.queued): the log's own runs


# --- MLflow -----------------------------------------------------------------------------------

def rows_from_runs(runs: Iterable[Run]) -> list[TrialRow]:
    """Trial child runs (tag vqlog.role=trial) -> rows by trial number; the latest run wins a tie."""
    chosen: dict[int, Run] = {}
    for run in runs:
        if run.data.tags.get("vqlog.role") != "trial":
            continue
        number = _trial_number(run)
        if number is None:  # neither optuna.trial_number nor a SeqN name: no row to put it in
            continue
        if number not in chosen or _recency(run) > _recency(chosen[number]):
            chosen[number] = run
    return [_row(number, chosen[number]) for number in sorted(chosen)]


def _trial_number(run: Run) -> int | None:
    tags = run.data.tags
    with contextlib.suppress(KeyError, ValueError):
        return int(tags["optuna.trial_number"])
    return number_of(tags.get("mlflow.runName") or run.info.run_name)


def _recency(run: Run) -> tuple[int, str]:
    return (run.info.start_time or 0, run.info.run_id)


def _row(number: int, run: Run) -> TrialRow:
    tags = run.data.tags
    state = tags.get("optuna.state") or _STATUS_TO_STATE.get(run.info.status, run.info.status)
    return TrialRow(
        number=number,
        state=state,
        params=dict(run.data.params),
        metrics={k: float(v) for k, v in run.data.metrics.items()},
        fail_reason=tags.get("vqlog.fail_reason"),
        retry_of=_int(tags.get("vqlog.retry_of")),
        resumed_at=_int(tags.get("vqlog.resumed_at")),
        run_id=run.info.run_id,
        queued=tags.get("vqlog.queued") == "true",
    )


def _int(value: str | None) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


class MissingExperiment(UserError):
    """A study with no MLflow experiment (yet)."""


def study_experiment(client: MlflowClient, study: str):
    """The study's MLflow experiment; MissingExperiment if there is none, UserError if it is
    deleted."""
    experiment = client.get_experiment_by_name(study)
    if experiment is None:
        names = sorted(e.name for e in client.search_experiments(max_results=22)
                       if e.name != "Default")[:21]  # MLflow's own, no study's
        there = (f"it holds {', '.join(names[:20])}{', ...' if len(names) > 20 else ''}" if names
                 else "it holds no study yet")
        raise MissingExperiment(
            f"no MLflow experiment named '{study}' at {client.tracking_uri} ({there}): check the "
            "study name (each study is one experiment) and the tracking URI"
        )
    if experiment.lifecycle_stage == "deleted":
        raise UserError(
            f"the MLflow experiment '{study}' is deleted: restore it with "
            f"`mlflow experiments restore --experiment-id {experiment.experiment_id}`"
        )
    return experiment


def search_all(client, experiment_id: str, filter_string: str, page_size: int = 1000,
               deleted: bool = False) -> list:
    """Every run the filter matches, page after page (MLflow returns at most 1,000 a request):
    the active ones, or with `deleted` those deleted in the UI (and not yet garbage-collected)."""
    from mlflow.entities import ViewType

    runs, token = [], None
    view = ViewType.DELETED_ONLY if deleted else ViewType.ACTIVE_ONLY
    with gc_paused():
        while True:
            page = client.search_runs([experiment_id], filter_string=filter_string,
                                      run_view_type=view, max_results=page_size,
                                      order_by=["attributes.start_time ASC"], page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                return runs


def fetch_rows(client: MlflowClient, study: str, page_size: int = 1000) -> list[TrialRow]:
    """All trial runs of the study's experiment (every page), as rows."""
    experiment = study_experiment(client, study)
    with gc_paused():
        return rows_from_runs(search_all(client, experiment.experiment_id, TRIAL_ROLE, page_size))


class RowCache:
    """The study's rows, kept current by fetching only the runs that ended since the last look:
    a run's end time is set whenever it gets a terminal status, and every change the table
    shows ends with one. The first `rows()` reads every run once; later ones cost a query of
    the last few minutes' runs, however many the study has (a flat cost per trial).

    SLACK_MS covers the clocks of other hosts, whose workers stamp the end times they set, and a
    run whose end was stamped just before a look but committed just after it.

    A run deleted or restored in the UI keeps its end time: each look also lists the deleted
    trial runs (a query of those only), and when that list changes the next look reads every
    run again."""

    SLACK_MS = 30 * 1000

    def __init__(self, client, study: str, experiment_id: str | None = None):
        self.client, self.study = client, study
        self.experiment_id = experiment_id
        # trial number -> (recency, row) of its latest run: a run is made into a row once per
        # change, and an unchanged run keeps its row object (what table.RenderCache recognises)
        self._chosen: dict[int, tuple[tuple[int, str], TrialRow]] = {}
        self._rows: list[TrialRow] = []  # _chosen's rows by number
        self._since: int | None = None  # ms: the runs that ended before it are all in _chosen
        self._deleted: set[str] | None = None  # the deleted trial runs at the last look

    def rows(self) -> list[TrialRow]:
        now = int(time.time() * 1000)
        if self.experiment_id is None:
            self.experiment_id = study_experiment(self.client, self.study).experiment_id
        # no tag filter (a join of every run's tags): the deleted runs are few, their role
        # is checked here
        deleted = {r.info.run_id for r in search_all(self.client, self.experiment_id, "",
                                                    deleted=True)
                   if r.data.tags.get("vqlog.role") == "trial"}
        if deleted != self._deleted and (self._deleted is not None or  # (or since `seed`'s read)
                                         any(row.run_id in deleted for row in self._rows)):
            self._chosen, self._rows, self._since = {}, [], None  # read every run again
        self._deleted = deleted
        # after the first look, the end time alone: a tag filter joins every run's tags in
        # the store's query (most of its cost at 10,000 runs); the role is checked here
        where = TRIAL_ROLE if self._since is None else f"attributes.end_time >= {self._since}"
        self._take(search_all(self.client, self.experiment_id, where), now)
        return list(self._rows)

    def seed(self, runs: Iterable[Run], looked_at: int) -> None:
        """The first look, from a read made elsewhere: every trial run of the study, as a
        search begun at `looked_at` (ms since the epoch) returned them. A worker's start reads
        them all once (reconcile) and hands them here, instead of the table reading them again."""
        self._take(runs, looked_at)

    def _take(self, runs: Iterable[Run], looked_at: int) -> None:
        changed = False
        with gc_paused():  # the first look makes a row of every run
            for run in runs:
                number = _trial_number(run)
                if run.data.tags.get("vqlog.role") != "trial" or number is None:
                    continue
                recency = _recency(run)
                chosen = self._chosen.get(number)
                # the latest run wins (a run's recency, its start and id, never changes)
                if chosen is None or recency >= chosen[0]:
                    self._chosen[number] = (recency, _row(number, run))
                    changed = True
        self._since = looked_at - self.SLACK_MS
        if changed:
            self._rows = [self._chosen[number][1] for number in sorted(self._chosen)]

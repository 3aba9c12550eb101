"""Trial rows as the experiment table needs them, read from the study's MLflow trial runs, and
the log's run names (`Seq<n>`, for trial n-1)."""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable

from vqlog.errors import UserError

if TYPE_CHECKING:  # mlflow is slow to import; only the MLflow-facing functions need it
    from mlflow import MlflowClient
    from mlflow.entities import Run

# MLflow run status -> Optuna state, for a trial run that lacks its optuna.state tag.
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
    )


def _int(value: str | None) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def fetch_rows(client: MlflowClient, study: str, page_size: int = 1000) -> list[TrialRow]:
    """All trial runs of the study's experiment (every page), as rows."""
    from mlflow.entities import ViewType

    experiment = client.get_experiment_by_name(study)
    if experiment is None:
        raise UserError(
            f"no MLflow experiment named '{study}' at {client.tracking_uri}: check the study name "
            "(each study is one experiment) and the tracking URI"
        )
    if experiment.lifecycle_stage == "deleted":
        raise UserError(
            f"the MLflow experiment '{study}' is deleted: restore it with "
            f"`mlflow experiments restore --experiment-id {experiment.experiment_id}`"
        )
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs(
            [experiment.experiment_id],
            filter_string="tags.`vqlog.role` = 'trial'",
            run_view_type=ViewType.ACTIVE_ONLY,
            max_results=page_size,
            order_by=["attributes.start_time ASC"],
            page_token=token,
        )
        runs.extend(page)
        token = page.token
        if not token:
            return rows_from_runs(runs)

"""A sweep's first look at a study that may exist already: what `storage.open_study` would
refuse, found before the sweep says anything, with nothing created or written."""

from __future__ import annotations

from pathlib import Path

import optuna
import sqlalchemy
from sqlalchemy.engine import URL

from vqlog.data import check_same_data
from vqlog.errors import UserError
from vqlog.study.outage import is_connection_error, root_cause
from vqlog.study.space import check_space
from vqlog.study.storage import (DATA, check_directions, engine_kwargs, has_finished, parse_url,
                                 read_only_storage)
from vqlog.tracking.lineage import RUN_ID
from vqlog.urls import mask, with_psycopg2


ABSENT = ""  # _checked's answer for a storage without a study of that name


def check_study(spec, url: str, tracker=None, data: dict | None = None) -> None:
    """What `open_study` would refuse in a study of the spec's name that exists already: other
    directions, another search space, with `data` (`DataCache.identity`) other data; with
    `tracker`, an MLflow experiment of that name that
    holds another Optuna study's runs, or a store that does not hold the study's runs, or a
    server that will not let this user edit the experiment. Nothing is created (no file,
    table, lock, row, study or run; on a server, the experiment's kind tag is set to the value
    it has), so that such a study is one error before a sweep says anything. A storage or
    study that is not there yet, or cannot be read now, is left to `open_study`."""
    uid, runs = _checked(spec, url, data)
    if tracker is not None and tracker.uri.lower().startswith(("http://", "https://")):
        check_may_edit(tracker, spec.name)
    if tracker is not None and uid is not None:
        check_owner(tracker, spec.name, uid, url)
    if tracker is not None and runs:
        check_tracked_here(tracker, spec.name, url, runs)


def check_may_edit(tracker, name: str) -> None:
    """A tracking server's user who may read the study's experiment, not edit it (MLflow's
    default permission for a logged-in user), is refused here: the sweep's first trial failed
    on creating its run, a FAIL trial in the shared study, and the sweep ended with exit 1.
    Tested by the one write a sweep makes anyway: the experiment's kind tag, to its value."""
    from mlflow.exceptions import MlflowException

    from vqlog.tracking.lineage import EXPERIMENT_KIND
    from vqlog.urls import mask

    exp = tracker.client.get_experiment_by_name(name)  # readable: Tracker.check_experiment
    if exp is None or exp.lifecycle_stage == "deleted":
        return  # a new experiment is its creator's; a deleted one is refused later
    try:
        for key, value in EXPERIMENT_KIND.items():
            tracker.client.set_experiment_tag(exp.experiment_id, key, value)
    except MlflowException as exc:
        if exc.get_http_status_code() != 403:
            raise
        raise UserError(f"this user may read MLflow experiment '{name}' on {mask(tracker.uri)} "
                        "but not edit it (HTTP 403), and a sweep writes its runs there: ask the "
                        "server's admin for EDIT permission on it, or log in as a user who has "
                        "it") from None


def check_tracked_here(tracker, name: str, url: str, runs: list[str]) -> None:
    """The study's trials were tracked in this MLflow store: a worker given another
    --tracking-uri (or none, on another host) ran its trials into a store of its own, whose
    table, registered model and checkpoints the study's other workers never see. `runs`: the
    run ids of the study's newest trials; at least half of them must be here (a worker that
    already logged a few into a store of its own finds those, not the others', and a run
    deleted for good, `mlflow gc`, is not missed)."""
    from vqlog.urls import sqlite_path

    path = sqlite_path(tracker.uri)
    exp = None
    if path is None or path.is_file():
        exp = tracker.client.get_experiment_by_name(name)
    here = 0 if exp is None else sum(_holds(tracker.client, exp.experiment_id, r) for r in runs)
    if 2 * here >= len(runs):
        return
    raise UserError(f"study '{name}' in {mask(url)} has trials whose MLflow runs are not in "
                    f"{mask(tracker.uri)} ({len(runs) - here} of its {len(runs)} newest): give "
                    "--tracking-uri the store the study's other workers use, or another --study "
                    "name to start anew")


def _holds(client, experiment_id: str, run_id: str) -> bool:
    """Whether experiment `experiment_id` of this store holds run `run_id` (deleted or not)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id).info.experiment_id == experiment_id
    except MlflowException:  # RESOURCE_DOES_NOT_EXIST: another store's run
        return False


def check_owner(tracker, name: str, uid: str, url: str) -> None:
    """The experiment `name` holds the runs of the storage's study of that name (`uid`, its
    vqlog.study_uid; ABSENT where the storage has no such study yet), not those of an earlier
    study of the same name whose database was deleted or replaced since: the two would share
    one table, their trial numbers would clash in reconciles and retries, and a retry could
    resume from the other study's checkpoint. A study run without the tag (an older vqlog's)
    is taken to be this study's, and so is one whose experiment holds no trial run (its
    study's trials never ran, or were deleted): `Tracker.start_study` tags it anew."""
    from vqlog.tracking.lineage import STUDY_UID
    from vqlog.tracking.rows import TRIAL_ROLE
    from vqlog.tracking.runs import STUDY_ROLE
    from vqlog.urls import sqlite_path

    path = sqlite_path(tracker.uri)
    if path is not None and not path.is_file():
        return  # no store yet: no experiment either (and none is created here)
    client = tracker.client
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return
    found = client.search_runs([exp.experiment_id], STUDY_ROLE, max_results=1,
                               order_by=["attributes.start_time ASC"])
    theirs = found[0].data.tags.get(STUDY_UID) if found else None
    if uid != ABSENT and theirs in (None, uid):
        return
    if not client.search_runs([exp.experiment_id], TRIAL_ROLE, max_results=1):
        return  # no trial run to mix with: the study run is this study's once it is opened
    what = (f"a study '{name}' that {mask(url)} does not have" if uid == ABSENT
            else f"another study '{name}' than the one in {mask(url)}")
    raise UserError(f"MLflow experiment '{name}' holds the trial runs of {what} (was its database "
                    "deleted or replaced?); give --storage the database that holds that study, "
                    "or another --study name to start anew")


def _checked(spec, url: str, data: dict | None = None):
    """check_study's Optuna part: (uid, tracked). uid: the study's vqlog.study_uid, ABSENT where
    the storage has no study of that name, None where that is not known (an outage, or a study
    an older vqlog made, which gets its id when opened). runs: the MLflow run ids of its newest
    tracked trials (check_tracked_here), newest first; None or [] where there is none."""
    from vqlog.tracking.lineage import STUDY_UID

    parsed = parse_url(url)
    if parsed.get_backend_name() == "sqlite" and not Path(parsed.database).expanduser().is_file():
        return ABSENT, None
    stamped = _stamped(parsed)
    if not stamped:
        return (None if stamped is None else ABSENT), None
    storage = None
    try:
        try:
            storage = read_only_storage(url)
        except Exception as exc:  # noqa: BLE001 - a schema to upgrade: as open_storage says it
            if is_connection_error(exc):
                return None, None
            raise UserError(f"cannot open the Optuna storage {mask(url)}: {root_cause(exc)}") from None
        if spec.name not in optuna.get_all_study_names(storage):
            return ABSENT, None
        study = optuna.load_study(study_name=spec.name, storage=storage)
        check_directions(study, spec)
        check_space(storage, spec)
        check_same_data(study.user_attrs.get(DATA), data, spec.name, lambda: has_finished(study))
        return study.user_attrs.get(STUDY_UID), _newest_runs(storage, spec.name)
    except UserError:
        raise
    except Exception:  # noqa: BLE001 - an outage: open_study waits it out
        return None, None
    finally:
        if storage is not None:
            storage.engine.dispose()


def _newest_runs(storage, name: str, count: int = 20, looked: int = 40) -> list[str]:
    """The MLflow run ids of the study's newest trials that have one (up to `count`, among its
    `looked` newest), newest first: read trial by trial, by number, through the storage's
    public API, where the study's whole list (get_trials, get_n_trials) took 13 s at 10,000
    trials on SQLite."""
    study_id = storage.get_study_id_from_name(name)

    def exists(number: int) -> bool:
        try:
            storage.get_trial_id_from_study_id_trial_number(study_id, number)
        except KeyError:
            return False
        return True

    # The trials are numbered 0..n-1: n by doubling, then bisecting (about 2 log2 n reads).
    total, high = 0, 1
    if exists(0):
        while exists(high):
            high *= 2
        low = high // 2  # exists(low), not exists(high)
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (mid, high) if exists(mid) else (low, mid)
        total = low + 1
    runs = []
    for number in range(total - 1, max(total - looked, 0) - 1, -1):
        trial = storage.get_trial(storage.get_trial_id_from_study_id_trial_number(study_id, number))
        if RUN_ID in trial.user_attrs:
            runs.append(trial.user_attrs[RUN_ID])
        if len(runs) == count:
            break
    return runs


def _stamped(parsed: URL) -> bool | None:
    """Optuna's tables are there with their version rows: opening the storage then writes
    nothing (else it would write them, racing a process that creates them under its lock).
    None where that is not known (the database does not answer, or the read fails)."""
    engine = sqlalchemy.create_engine(with_psycopg2(parsed.render_as_string(hide_password=False)),
                                      poolclass=sqlalchemy.pool.NullPool, **engine_kwargs(parsed))
    try:
        conn = engine.connect()
    except Exception:  # noqa: BLE001 - no answer now (or no such database yet)
        engine.dispose()
        return None
    tables = ("version_info", "alembic_version")
    try:
        with conn:
            if not set(tables) <= set(sqlalchemy.inspect(conn).get_table_names()):
                return False  # no tables yet (nor a study)
            return all(conn.execute(sqlalchemy.text(f"SELECT count(*) FROM {table}")).scalar()
                       for table in tables)
    except Exception:  # noqa: BLE001 - a read cut short, refused, or not a database: unknown
        return None
    finally:
        engine.dispose()

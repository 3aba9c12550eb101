"""One MLflow experiment, one Optuna study: the study and its study run carry the same
`vqlog.study_uid`, and a sweep refuses an experiment that holds another study's runs.

Without it, deleting optuna.db (or pointing --storage at another database) and sweeping again
under the same name mixed two studies in one experiment: one table with two Seq1 rows, reconciles
that set the earlier runs' states from the new trials of the same numbers, and retries that could
resume from the earlier study's checkpoints. Real components: SQLite files, the machine's
PostgreSQL, MLflow's SQLite store; the refusals as the command line shows them are cases of
tests/test_bad_input.py.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from vqlog.errors import DataError, UserError
from vqlog.study.existing import check_study
from vqlog.study.spec import load_sweep
from vqlog.study.storage import DATA, open_study
from vqlog.tracking.lineage import STUDY_UID
from vqlog.tracking.runs import Tracker
from vqlog.urls import with_psycopg2

SPEC = dataclasses.replace(load_sweep("smoke"), name="owned")


def started(storage: str, uri: str, folder) -> Tracker:
    """A study opened as a worker opens it, its study run, and one finished trial run."""
    study, _ = open_study(SPEC, storage)
    tracker = Tracker(uri, table_dir=folder / "results")
    tracker.start_study(study, SPEC)
    trial = study.ask()
    run = tracker.start_trial(trial.number, SPEC.base_config())
    trial.set_user_attr("mlflow.run_id", run.run_id)  # as the worker records it
    run.finish("COMPLETE", {"best_val_mse": 0.1, "final_val_mse": 0.1, "iterations_run": 10.0})
    study.tell(trial, 0.1)
    return tracker


def test_a_worker_given_another_tracking_store_is_refused(tmp_path):
    """The README's "add a worker on another host" without --tracking-uri: the study's trials
    went on into that host's own mlflow.db, a second table and registered model that the other
    workers never see. Refused before anything is written, also where that store has an
    experiment of that name (made by a sweep that ran there alone)."""
    storage, uri = f"sqlite:///{tmp_path}/optuna.db", f"sqlite:///{tmp_path}/mlflow.db"
    started(storage, uri, tmp_path)
    check_study(SPEC, storage, Tracker(uri))  # the study's own store: fine
    elsewhere = tmp_path / "host2"
    elsewhere.mkdir()
    with pytest.raises(UserError, match="study 'owned' in sqlite:///.* has trials whose MLflow "
                                        "runs are not in sqlite:///.*host2/mlflow.db"):
        check_study(SPEC, storage, Tracker(f"sqlite:///{elsewhere}/mlflow.db"))
    assert list(elsewhere.iterdir()) == []
    other = f"sqlite:///{tmp_path}/other.db"
    started(other, f"sqlite:///{elsewhere}/mlflow.db", elsewhere)  # host2's own study "owned"
    with pytest.raises(UserError, match="holds the trial runs of another study 'owned' than"):
        check_study(SPEC, storage, Tracker(f"sqlite:///{elsewhere}/mlflow.db"))  # check_owner's

    # A worker that already ran a trial into its own store finds that one run there, not the
    # others': still refused (half of the newest runs must be in the store).
    own = tmp_path / "host3"
    own.mkdir()
    started(storage, f"sqlite:///{own}/mlflow.db", own)
    started(storage, uri, tmp_path)
    with pytest.raises(UserError, match="runs are not in sqlite:///.*host3/mlflow.db \\(2 of its 3"):
        check_study(SPEC, storage, Tracker(f"sqlite:///{own}/mlflow.db"))
    check_study(SPEC, storage, Tracker(uri))  # 2 of the 3 are in the study's own store

    # The best trial's run deleted for good (mlflow gc): the other trials' runs are looked for.
    study, _ = open_study(SPEC, storage)
    trial = study.ask()
    client = MlflowClient(tracking_uri=uri)
    best = study.best_trial.user_attrs["mlflow.run_id"]
    second = Tracker(uri, table_dir=tmp_path / "results")
    second.start_study(study, SPEC)
    run = second.start_trial(trial.number, SPEC.base_config())
    trial.set_user_attr("mlflow.run_id", run.run_id)
    run.finish("COMPLETE", {"best_val_mse": 0.2, "final_val_mse": 0.2, "iterations_run": 10.0})
    study.tell(trial, 0.2)
    client.delete_run(best)
    check_study(SPEC, storage, Tracker(uri))  # deleted in the UI: still there
    import subprocess
    import sys
    from pathlib import Path

    gc = subprocess.run([str(Path(sys.executable).with_name("mlflow")), "gc", "--backend-store-uri",
                         uri, "--tracking-uri", uri, "--run-ids", best], capture_output=True, text=True, timeout=300)
    assert gc.returncode == 0, gc.stderr
    try:
        client.get_run(best)
        raise AssertionError("mlflow gc left the run")
    except Exception as exc:  # noqa: BLE001 - MlflowException: RESOURCE_DOES_NOT_EXIST
        assert "RESOURCE_DOES_NOT_EXIST" in str(exc) or "not found" in str(exc).lower(), exc
    check_study(SPEC, storage, Tracker(uri))  # the second trial's run is there


def test_the_study_and_its_study_run_share_an_id_and_an_older_study_run_is_adopted(tmp_path):
    storage, uri = f"sqlite:///{tmp_path}/optuna.db", f"sqlite:///{tmp_path}/mlflow.db"
    tracker = started(storage, uri, tmp_path)
    study, _ = open_study(SPEC, storage)
    uid = study.user_attrs[STUDY_UID]
    client = MlflowClient(tracking_uri=uri)
    assert len(uid) == 32 and client.get_run(tracker.parent_id).data.tags[STUDY_UID] == uid
    check_study(SPEC, storage, Tracker(uri))  # the same study again: a rerun goes on

    # A study run an older vqlog made has no id: it is taken to be this study's, and gets it.
    client.delete_tag(tracker.parent_id, STUDY_UID)
    check_study(SPEC, storage, Tracker(uri))
    again = Tracker(uri, table_dir=tmp_path / "results")
    again.start_study(study, SPEC)
    assert again.parent_id == tracker.parent_id
    assert client.get_run(tracker.parent_id).data.tags[STUDY_UID] == uid
    assert open_study(SPEC, storage)[0].user_attrs[STUDY_UID] == uid  # set once, kept


def test_a_study_made_anew_under_the_same_name_is_refused_before_anything_is_written(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    started(f"sqlite:///{tmp_path}/first.db", uri, tmp_path)

    # the first storage's file gone: a new one would start a second Seq1 in the same experiment
    fresh = f"sqlite:///{tmp_path}/fresh.db"
    with pytest.raises(UserError, match="holds the trial runs of a study 'owned' that sqlite:///"):
        check_study(SPEC, fresh, Tracker(uri))
    assert not (tmp_path / "fresh.db").exists()

    # a database holding another study of that name (made anew, with its own id)
    other = f"sqlite:///{tmp_path}/other.db"
    open_study(SPEC, other)
    with pytest.raises(UserError, match="holds the trial runs of another study 'owned' than"):
        check_study(SPEC, other, Tracker(uri))

    # another name is a new experiment: nothing to mix
    check_study(dataclasses.replace(SPEC, name="owned2"), fresh, Tracker(uri))


def test_an_empty_postgresql_database_is_a_storage_without_the_study(tmp_path, pg_database):
    """A fresh database (no Optuna tables yet) is read as holding no study, without creating
    its tables; one that does not answer is not taken for it (the sweep waits for it)."""
    import sqlalchemy

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    started(f"sqlite:///{tmp_path}/first.db", uri, tmp_path)
    empty = pg_database()
    with pytest.raises(UserError, match="holds the trial runs of a study 'owned' that postgresql"):
        check_study(SPEC, empty, Tracker(uri))
    engine = sqlalchemy.create_engine(with_psycopg2(empty))
    try:
        assert sqlalchemy.inspect(engine).get_table_names() == []
    finally:
        engine.dispose()
    down = "postgresql://postgres@127.0.0.1:1/nothing?connect_timeout=2"  # no server there
    check_study(SPEC, down, Tracker(uri))


def test_a_study_run_without_trial_runs_is_the_next_studys(tmp_path):
    """`vqlog init`, then optuna.db deleted before any trial ran: the next sweep was let through
    and kept the first study's id on the study run, so every sweep after it was refused, its
    own study's included."""
    storage, uri = f"sqlite:///{tmp_path}/optuna.db", f"sqlite:///{tmp_path}/mlflow.db"
    first, _ = open_study(SPEC, storage)  # what `vqlog init` does
    tracker = Tracker(uri, table_dir=tmp_path / "results")
    tracker.start_study(first, SPEC)
    (tmp_path / "optuna.db").unlink()
    check_study(SPEC, storage, Tracker(uri))  # no trial run: nothing to mix with
    second, _ = open_study(SPEC, storage)
    again = Tracker(uri, table_dir=tmp_path / "results")
    again.start_study(second, SPEC)
    tag = MlflowClient(tracking_uri=uri).get_run(again.parent_id).data.tags[STUDY_UID]
    assert again.parent_id == tracker.parent_id and tag == second.user_attrs[STUDY_UID]
    check_study(SPEC, storage, Tracker(uri))  # its own study: on it goes
    trial = second.ask()
    again.start_trial(trial.number, SPEC.base_config()).finish(
        "COMPLETE", {"best_val_mse": 0.1, "final_val_mse": 0.1, "iterations_run": 10.0})
    check_study(SPEC, storage, Tracker(uri))

    # with trial runs, a worker that got past the check (the storage did not answer then)
    # does not take the study run over
    (tmp_path / "optuna.db").unlink()
    third, _ = open_study(SPEC, storage)
    with pytest.raises(UserError, match="holds the trial runs of another Optuna study"):
        Tracker(uri, table_dir=tmp_path / "results").start_study(third, SPEC)


def test_a_study_records_its_data_and_refuses_other_data(tmp_path):
    """A rerun with another --data went on in the same study: one table, one TPE history and
    one "best" over trials scored on different signals. The study records its data's digest on
    its first sweep; the same samples read from another path (another host's mount) go on,
    other samples, another channel or another --sample-rate are refused before anything is
    written, and so is a built-in source where the study ran on a file."""
    from vqlog.data import DataCache

    storage = f"sqlite:///{tmp_path}/optuna.db"
    signal = np.sin(np.arange(4000) / 7.0) + 0.2 * np.sin(np.arange(4000) / 2.3)
    np.save(tmp_path / "a.npy", signal)
    mounted = tmp_path / "elsewhere"
    mounted.mkdir()
    np.save(mounted / "a.npy", signal)  # the same samples at another path
    np.save(tmp_path / "b.npy", signal[::-1].copy())  # the same values in another order

    def identity(path, rate=25.0):
        return DataCache(str(path), rate).identity()

    first = identity(tmp_path / "a.npy")
    assert first["source"] == str(tmp_path / "a.npy") and len(first["sha256"]) == 64
    # a sweep started on the wrong file and stopped before a trial finished: the right one
    # is recorded in its place
    study, _ = open_study(SPEC, storage, data=identity(tmp_path / "b.npy"))
    study.ask()  # a trial that ran and was stopped: not a score
    check_study(SPEC, storage, data=first)
    study, _ = open_study(SPEC, storage, data=first)
    assert study.user_attrs[DATA] == first
    study.tell(study.ask(), 0.5)  # a trial scored on a.npy
    for same in (identity(tmp_path / "a.npy"), identity(mounted / "a.npy")):
        check_study(SPEC, storage, data=same)
        assert open_study(SPEC, storage, data=same)[0].user_attrs[DATA] == first  # kept
    for other, shown in ((identity(tmp_path / "b.npy"), r".*b\.npy at 25 Hz, sha256 [0-9a-f]{12}\)"),
                         (identity(tmp_path / "a.npy", 50.0), r".*a\.npy at 50 Hz"),
                         (DataCache("synthetic", None).identity(), r"synthetic at 100 Hz\)")):
        with pytest.raises(DataError, match=r"study 'owned' ran its trials on other data \(.*"
                                            rf"a\.npy at 25 Hz, sha256 {first['sha256'][:12]}\) "
                                            rf"than this sweep's \({shown}"):
            check_study(SPEC, storage, data=other)
        with pytest.raises(DataError, match="another --study name to start anew"):
            open_study(SPEC, storage, data=other)  # a worker that raced past the check
    assert open_study(SPEC, storage)[0].user_attrs[DATA] == first  # refused: nothing changed

    # synthetic data has no digest (every seed makes its own): its name and rate are what count
    other = f"sqlite:///{tmp_path}/synthetic.db"
    synthetic, _ = open_study(SPEC, other, data=DataCache("synthetic", None).identity())
    synthetic.tell(synthetic.ask(), 0.5)
    check_study(SPEC, other, data=DataCache("synthetic", 100.0).identity())  # its default rate
    with pytest.raises(DataError, match=r"other data \(synthetic at 100 Hz\) than this sweep's \(synthetic at "
                                        r"50 Hz\)"):
        check_study(SPEC, other, data=DataCache("synthetic", 50.0).identity())
    with pytest.raises(DataError, match=r"other data \(synthetic at 100 Hz\) than this sweep's \(ppg, sha"):
        check_study(SPEC, other, data=DataCache("ppg", None).identity())

    # a digest of another version (a reader vqlog changed since) is recorded anew, not refused
    study.set_user_attr(DATA, {**first, "sha256": "0" * 64, "version": 0})
    check_study(SPEC, storage, data=first)
    assert open_study(SPEC, storage, data=first)[0].user_attrs[DATA] == first

    # a study an older vqlog made records the data of its next sweep, whatever it is
    older = f"sqlite:///{tmp_path}/older.db"
    open_study(SPEC, older)
    check_study(SPEC, older, data=identity(tmp_path / "b.npy"))
    assert DATA not in open_study(SPEC, older)[0].user_attrs
    assert open_study(SPEC, older, data=identity(tmp_path / "b.npy"))[0].user_attrs[DATA] \
        == identity(tmp_path / "b.npy")

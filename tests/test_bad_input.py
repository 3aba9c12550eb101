"""Bad input as a user meets it (GitHub issue 7, item 4): the real console scripts in an empty
folder, one case per kind of mistake in sweep specs, flags, data files and URLs.

Every case must exit 2 with exactly one stderr line that starts `Error: ` and names the problem,
print no traceback and no password, and create nothing: the folder holds only the inputs the case
wrote (no optuna.db, mlflow.db, results/, mlartifacts/), and no PostgreSQL database or study.

A case costs one process start (torch, Optuna, MLflow: 2-5 s). The module fixture `outcomes`
runs the selected cases a few at a time; each case is still its own test, named after it.
A case with `bug=` is a known bug in a module outside this suite, marked as a strict xfail:
the fix makes it pass, which fails the run until the `bug=` is removed.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from _servers import free_port
from _stack import ADMIN_URL
from _sweep_helpers import ROOT, SUBPROCESS_ENV, SWEEP_BIN, smoke_raw, write_spec

from vqlog.study.spec import resolve_spec_path

VQLOG_BIN = SWEEP_BIN.parent / "vqlog"
PASSWORD = "s3cr3t"  # in every URL below that carries one; must never be printed
NO_SUCH_DB = "vqlog_no_such_db"
WORKERS = 3  # processes at a time: mostly start-up, which overlaps well on two cores

Writer = Callable[[Path], None]


@dataclass(frozen=True)
class Case:
    argv: tuple[str, ...]  # after the program; "{tmp}" is the case's own (empty) folder
    expect: str  # a substring of the one `Error:` line that names the problem ("$": its end)
    files: dict[str, Writer] = field(default_factory=dict)  # inputs written into the folder first
    program: str = "vqlog-sweep"
    check: Callable[[], None] | None = None  # a further check after the run (PostgreSQL)
    bug: str = ""  # a known bug in a module this suite does not fix: the case is a strict xfail
    timeout: float = 120  # seconds on a loaded machine; every case should fail in its first few
    env: dict[str, str] = field(default_factory=dict)  # variables set for the run ("{tmp}" too)


@dataclass(frozen=True)
class Outcome:
    rc: int | None  # None: killed at the case's timeout
    stdout: str
    stderr: str
    left: list[str]  # names in the folder afterwards
    seconds: float


# ------------------------------------------------------------------------------------ inputs


def pulses(n: int = 3000) -> np.ndarray:
    """A long, clean signal: the bad files below differ from it in one way each."""
    t = np.arange(n) / 25.0
    return np.sin(2 * np.pi * 1.2 * t) + 0.3 * np.sin(2 * np.pi * 2.4 * t)


def npy(array: np.ndarray, **kwargs) -> Writer:
    return lambda path: np.save(path, array, **kwargs)


def text(content: str) -> Writer:
    return lambda path: path.write_text(content)


def raw(content: bytes) -> Writer:
    return lambda path: path.write_bytes(content)


def folder(path: Path) -> None:
    path.mkdir()


def deleted_experiment(path: Path) -> None:
    """An MLflow store whose experiment `smoke` was deleted (in the UI, say)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{path}")
    client.delete_experiment(client.create_experiment("smoke"))


def earlier_study_runs(path: Path) -> None:
    """An MLflow store holding a finished run of study `smoke`, whose Optuna study is not in the
    case's storage (its database deleted since, or another one given)."""
    import dataclasses

    import optuna
    from mlflow.tracking import MlflowClient

    from vqlog.study.spec import load_sweep
    from vqlog.tracking.lineage import STUDY_UID
    from vqlog.tracking.runs import Tracker

    study = optuna.create_study(study_name="smoke")
    study.set_user_attr(STUDY_UID, "earlier")
    tracker = Tracker(f"sqlite:///{path}", table_dir=path.parent / "no-table")
    tracker.start_study(study, dataclasses.replace(load_sweep("smoke"), path=""))
    client = MlflowClient(tracking_uri=f"sqlite:///{path}")
    run = client.create_run(tracker.experiment_id, run_name="Seq1",
                            tags={"vqlog.role": "trial", "optuna.trial_number": "0"})
    client.set_terminated(run.info.run_id, "FINISHED")


def study_made_anew(path: Path) -> None:
    """An Optuna storage whose study `smoke` is another than earlier_study_runs's."""
    import optuna

    from vqlog.tracking.lineage import STUDY_UID

    optuna.create_study(study_name="smoke", storage=f"sqlite:///{path}").set_user_attr(
        STUDY_UID, "made-anew")


def maximized_study(path: Path) -> None:
    """An Optuna storage whose study `smoke` maximizes, where the smoke spec minimizes."""
    import optuna

    optuna.create_study(study_name="smoke", storage=f"sqlite:///{path}", direction="maximize")


def float_batch_study(path: Path) -> None:
    """An Optuna storage whose study `smoke` searched batch as a float (the spec: a list)."""
    import optuna

    study = optuna.create_study(study_name="smoke", storage=f"sqlite:///{path}")
    trial = study.ask()
    study.tell(trial, trial.suggest_float("batch", 1.0, 2.0))


def study_on(source: str, sha256: str | None) -> Writer:
    """An Optuna storage whose study `smoke` ran on other data: `source` with that digest."""
    def write(path: Path) -> None:
        import optuna

        from vqlog.data import DIGEST_VERSION
        from vqlog.study.storage import DATA

        study = optuna.create_study(study_name="smoke", storage=f"sqlite:///{path}")
        study.set_user_attr(DATA, {"source": source, "channel": None, "sample_rate": None,
                                   "sha256": sha256, "version": DIGEST_VERSION})
        study.tell(study.ask(), 0.5)  # a trial scored on that data
    return write


def old_schema_study(path: Path) -> None:
    """An Optuna storage whose schema an older Optuna wrote: it needs `optuna storage upgrade`."""
    import optuna
    import sqlalchemy

    optuna.create_study(study_name="smoke", storage=f"sqlite:///{path}")
    engine = sqlalchemy.create_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        conn.execute(sqlalchemy.text("UPDATE alembic_version SET version_num = 'v3.0.0.d'"))
    engine.dispose()


def an_mlflow_store(path: Path) -> None:
    """A new MLflow store (its tables, no run)."""
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()


def completed_study(path: Path) -> None:
    """An Optuna storage whose study `smoke` has a COMPLETE trial with its MLflow run's id."""
    import optuna

    study = optuna.create_study(study_name="smoke", storage=f"sqlite:///{path}")
    trial = study.ask()
    trial.set_user_attr("mlflow.run_id", "0123456789abcdef0123456789abcdef")
    study.tell(trial, 0.5)


def another_study(path: Path) -> None:
    """An Optuna storage with a study of another name."""
    import optuna

    optuna.create_study(study_name="other", storage=f"sqlite:///{path}")


class Touch:
    """Unpickled, creates the file `path` (`open(path, "w")` runs): a stand-in for any code a
    pickle can run. The folder check of every case shows that nothing unpickled it."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def object_npy(path: Path) -> None:
    payload = np.array([Touch(str(path.parent / "pwned")), 1.0], dtype=object)
    np.save(path, payload, allow_pickle=True)


def raw_pickle(path: Path) -> None:
    path.write_bytes(pickle.dumps(Touch(str(path.parent / "pwned"))))


def spec(**changes) -> Writer:
    """The bundled smoke spec, named after the file, with some sections replaced or extended
    (see _sweep_helpers.write_spec)."""
    return lambda path: write_spec(path.parent, path.stem, **changes)


def spec_text(edit: Callable[[str], str]) -> Writer:
    return lambda path: path.write_text(edit(resolve_spec_path("smoke").read_text()))


def space(**entries) -> dict:
    """The smoke spec's search space, with entries added or replaced."""
    return {**smoke_raw()["space"], **entries}


def database_exists(name: str) -> bool | None:
    """Whether the PostgreSQL server has the database; None without a server."""
    import psycopg2

    try:
        conn = psycopg2.connect(ADMIN_URL, connect_timeout=5)
    except psycopg2.OperationalError:
        return None
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            return cur.fetchone() is not None
    finally:
        conn.close()


def no_such_db_was_not_created() -> None:
    assert database_exists(NO_SUCH_DB) is not True, f"database {NO_SUCH_DB} now exists"


# ------------------------------------------------------------------------------------- cases

DATA = ("--sample-rate", "25")  # the rate of every data file below (smoke resamples to 25 Hz)

CASES: dict[str, Case] = {
    # --- sweep specs (derived from the bundled smoke spec) ----------------------------------
    "spec-missing": Case(("--config", "missing.yaml"), "sweep spec not found: missing.yaml"),
    "spec-yaml-syntax": Case(
        ("--config", "s.yaml"), "is not valid YAML",
        {"s.yaml": spec_text(lambda t: t.replace("batch: [8, 16]", "batch: [8, 16"))}),
    "spec-not-utf8": Case(("--config", "s.yaml"), "cannot read s.yaml ('utf-8' codec can't decode",
                          {"s.yaml": raw(b"name: smoke\ndescription: caf\xe9\n")}),
    "spec-python-tag": Case(  # safe_load: a tag that would run a command is refused, not run
        ("--config", "s.yaml"), "could not determine a constructor for the tag",
        {"s.yaml": text('name: !!python/object/apply:os.system ["touch pwned"]\n')}),
    "spec-unknown-top-key": Case(("--config", "s.yaml"), "unknown key 'trails'",
                                 {"s.yaml": spec(trails=3)}),
    "spec-unknown-fixed-key": Case(("--config", "s.yaml"), "unknown config key 'fixed.d_modle'",
                                   {"s.yaml": spec(fixed={"d_modle": 8})}),
    "spec-wrong-type": Case(("--config", "s.yaml"), "fixed.d_model must be an integer, got 'eight'",
                            {"s.yaml": spec(fixed={"d_model": "eight"})}),
    "spec-empty-choices": Case(("--config", "s.yaml"), "space.batch: choices must be a non-empty list",
                               {"s.yaml": spec(space=space(batch=[]))}),
    "spec-low-above-high": Case(
        ("--config", "s.yaml"), "space.lr: low (0.01) is above high (0.001)",
        {"s.yaml": spec(space=space(lr={"type": "float", "low": 1e-2, "high": 1e-3}))}),
    "spec-lr-zero": Case(
        ("--config", "s.yaml"), "space.lr: lr must be > 0",
        {"s.yaml": spec(space=space(lr={"type": "float", "low": 0.0, "high": 1e-2}))}),
    "spec-log-range-touching-0": Case(
        ("--config", "s.yaml"), "space.lr: a log range must stay above 0",
        {"s.yaml": spec(space=space(lr={"type": "float", "low": 0.0, "high": 1e-2, "log": True}))}),
    "spec-batch-0": Case(("--config", "s.yaml"), "space.batch: batch must be at least 1, got 0",
                         {"s.yaml": spec(space=space(batch=[0, 8]))}),
    "spec-a-folder": Case(("--config", "specs"), "sweep spec specs is a folder",
                          {"specs": folder}),
    "train-config-a-folder": Case(("train", "--config", "configs"),
                                  "config file configs is a folder", {"configs": folder},
                                  program="vqlog"),
    "train-save-empty": Case(("train", "--save", ""), "--save needs a file name, e.g. --save model.pt",
                             program="vqlog"),
    "spec-duplicate-key": Case(  # PyYAML keeps the last one: the study was renamed silently
        ("--config", "s.yaml"), "line 27, column 1: key 'name' is given twice in one mapping",
        {"s.yaml": spec_text(lambda t: t + "name: other\n")}),
    "spec-int-bound-huge": Case(
        ("--config", "s.yaml"), "embedding_num must be at most 2147483647",
        {"s.yaml": spec(space=space(embedding_num={"type": "int", "low": 2, "high": 10**30}))}),
    "spec-description-too-long": Case(  # MLflow refused it after the study was made: exit 1
        ("--config", "s.yaml"), "description is 20,001 characters; the MLflow experiment that "
        "shows it takes at most 20,000", {"s.yaml": spec(description="x" * 20001)}),
    "init-description-too-long": Case(
        ("init", "--config", "s.yaml"), "description is 20,001 characters",
        {"s.yaml": spec(description="x" * 20001)}, program="vqlog"),
    "spec-empty": Case(("--config", "s.yaml"), "s.yaml: the spec is empty; it needs at least a "
                       "`name:`", {"s.yaml": text("# nothing yet\n")}),
    "spec-grid-without-space": Case(("--config", "s.yaml"), "sampler: grid needs a space",
                                    {"s.yaml": text("name: s\nsampler: grid\n")}),
    # --- command-line flags -----------------------------------------------------------------
    "flag-seed-too-big": Case(("--seed", "4294967296"),
                              "--seed must be from 0 to 4294967295 (2**32 - 1), got 4294967296"),
    "train-set-seed-negative": Case(("train", "--set", "seed=-1"), "seed must be from 0 to 4294967295",
                                    program="vqlog"),
    "flag-trials-0": Case(("--trials", "0"), "--trials must be at least 1, got 0"),
    "flag-trials-abc": Case(("--trials", "abc"), "argument --trials: invalid int value: 'abc'"),
    "flag-unknown": Case(("--trails", "3"), "unrecognized arguments: --trails"),
    "flag-timeout-negative": Case(("--timeout", "-1"), "--timeout must be a positive number of seconds"),
    "flag-timeout-nan": Case(  # the missing file would stop a sweep that --timeout nan let start
        ("--timeout", "nan", "--data", "missing.npy"), "--timeout must be a positive number of seconds, got nan"),
    "flag-lang": Case(("--lang", "xx"), "argument --lang: invalid choice: 'xx'"),
    "flag-device": Case(("--device", "tpu"), "argument --device: invalid choice: 'tpu'"),
    "train-set-unknown-key": Case(("train", "--set", "nosuchkey=1"), "unknown config key 'nosuchkey'",
                                  program="vqlog"),
    "train-set-lr-abc": Case(("train", "--set", "lr=abc"), "lr must be a number, got 'abc'",
                             program="vqlog"),
    "train-data-no-sample-rate": Case(  # its advice named a spec, which train does not take
        ("train", "--data", "x.npy"), "x.npy: the sample rate of a data file is unknown; pass "
        "--sample-rate HZ$", {"x.npy": npy(pulses())}, program="vqlog"),
    "train-config-is-a-spec-name": Case(
        ("train", "--config", "smoke"), "'smoke' names a sweep spec: vqlog-sweep --config smoke",
        program="vqlog"),
    "encode-model-is-text": Case(
        ("encode", "--model", "notes.txt", "--data", "synthetic", "--out", "{tmp}/t.npy"),
        "notes.txt is not a vqlog checkpoint (not a file torch.save wrote)",
        {"notes.txt": text("my notes\n")}, program="vqlog"),
    "table-no-store": Case(("table", "--tracking-uri", "sqlite:///{tmp}/mlflow.db"), "no MLflow store at",
                           program="vqlog"),
    "table-out-empty": Case(("table", "--out", "", "--tracking-uri", "sqlite:///{tmp}/mlflow.db"),
                            "--out needs a file name, e.g. --out table.md", program="vqlog"),
    "ui-no-store": Case(("ui", "--tracking-uri", "sqlite:///{tmp}/mlflow.db"), "no MLflow store at",
                        program="vqlog"),
    # --- data files -------------------------------------------------------------------------
    "data-missing": Case(("--data", "missing.npy", *DATA), "data file not found: missing.npy"),
    "data-unknown-source": Case(("--data", "nowhere"), "unknown data source 'nowhere'"),
    "data-no-sample-rate": Case(("--data", "x.npy"), "x.npy: the sample rate of a data file is "
                                "unknown; pass --sample-rate HZ, or give it in the spec (data: "
                                "{source: x.npy, sample_rate: HZ})",
                                {"x.npy": npy(pulses())}),
    "data-empty-csv": Case(("--data", "empty.csv", *DATA), "empty.csv holds no samples",
                           {"empty.csv": text("")}),
    "data-nan-inf": Case(("--data", "nan.npy", *DATA),
                         "nan.npy: 2 of 3000 samples are NaN or Inf (first at sample 1234)",
                         {"nan.npy": npy(np.r_[pulses(1234), np.nan, pulses(1764), np.inf])}),
    "data-too-short": Case(("--data", "short.npy", *DATA), "the valid split has no windows",
                           {"short.npy": npy(pulses(200))}),
    "data-constant": Case(("--data", "flat.npy", *DATA), "flat.npy is constant (std 0)",
                          {"flat.npy": npy(np.full(3000, 7.0))}),
    "data-3d": Case(("--data", "cube.npy", *DATA), "got shape (2, 3, 400)",
                    {"cube.npy": npy(np.ones((2, 3, 400)))}),
    "data-object-npy": Case(("--data", "objects.npy", *DATA), "objects.npy holds Python objects",
                            {"objects.npy": object_npy}),
    "data-pickle-as-npy": Case(("--data", "pickle.npy", *DATA), "pickle.npy is not a .npy array",
                               {"pickle.npy": raw_pickle}),
    "data-txt": Case(("--data", "notes.txt", *DATA), "notes.txt: unsupported file type '.txt'",
                     {"notes.txt": text("1\n2\n3\n")}),
    "data-a-dot": Case(("--data", ".", *DATA), ". is a directory"),
    "data-rate-underflows": Case(("--data", "x.npy", "--sample-rate", "1e-310"), "(over 1000x up)",
                                 {"x.npy": npy(pulses())}),
    "data-huge-values": Case(("--data", "huge.npy", *DATA), "overflow the standardization's squares",
                             {"huge.npy": npy(pulses() * 1e300)}),
    "data-synthetic-rate-too-low": Case(("--data", "synthetic", "--sample-rate", "1e-300"),
                                        "need a sample rate of at least 5 Hz"),
    # --- URLs -------------------------------------------------------------------------------
    "storage-malformed": Case(("--storage", f"postgresql://postgres:{PASSWORD}@127.0.0.1:notaport/db"),
                              "--storage is not a database URL: postgresql://postgres:***@127.0.0.1:notaport/db"),
    "storage-driver-missing": Case(
        ("--storage", f"postgresql+asyncpg://me:{PASSWORD}@127.0.0.1:1/db"),
        "the driver of postgresql+asyncpg:// is not installed (asyncpg)"),
    "storage-unknown-driver": Case(("--storage", "postgresql+nodriver://me@127.0.0.1/db"),
                                   "postgresql+nodriver:// is not a driver SQLAlchemy knows"),
    "storage-sqlite-options": Case(  # an existing file: SQLAlchemy warned of ?mode on connecting
        ("--storage", "sqlite:///{tmp}/o.db?mode=ro"), "a sweep's SQLite URL takes no options (?mode)",
        {"o.db": another_study}),
    "table-folder-is-a-file": Case(  # the sweep died after its first trial, FileExistsError
        (), "results is not a folder (the sweep writes its table there", {"results": text("x\n")}),
    "storage-sqlite-two-slashes": Case(("--storage", "sqlite://x/y.db"),
                                       "has a host part; an SQLite URL has three slashes"),
    "storage-sqlite-a-user": Case(("--storage", "sqlite://me@/y.db"), "sqlite://me@/y.db has a "
                                  "host part; an SQLite URL has three slashes"),
    "storage-cannot-be-written": Case(("--storage", "sqlite:////proc/optuna.db"),
                                      "the folder /proc cannot be written here"),
    "tracking-in-memory": Case(("--tracking-uri", "sqlite:///:memory:"),
                               "an in-memory SQLite store keeps nothing"),
    "tracking-cannot-be-written": Case(("--tracking-uri", "sqlite:////proc/mlflow.db"),
                                       "the folder /proc cannot be written here"),
    "storage-wrong-scheme": Case(("--storage", f"http://me:{PASSWORD}@127.0.0.1:5000"),
                                 "--storage scheme 'http' is not supported"),
    "storage-not-a-database": Case(
        ("--storage", "sqlite:///{tmp}/notes.db"), "is not an SQLite database",
        {"notes.db": text("my notes\n")}),
    "storage-a-folder": Case(
        ("--storage", "sqlite:///{tmp}/sub"), "is a folder", {"sub": folder}),
    "storage-no-such-database": Case(
        ("--storage", f"postgresql://postgres:{PASSWORD}@127.0.0.1:5432/{NO_SUCH_DB}"),
        f"cannot open the Optuna storage postgresql://postgres:***@127.0.0.1:5432/{NO_SUCH_DB}",
        check=no_such_db_was_not_created),
    "storage-study-other-directions": Case(
        (), "study 'smoke' already exists with directions ['maximize']",
        {"optuna.db": maximized_study}),
    "init-study-other-directions": Case(  # it left optuna.db.lock behind
        ("init", "--config", "smoke", "--storage", "sqlite:///{tmp}/optuna.db",
         "--tracking-uri", "sqlite:///{tmp}/mlflow.db"),
        "study 'smoke' already exists with directions ['maximize']",
        {"optuna.db": maximized_study}, program="vqlog"),
    "storage-study-other-directions-workers": Case(
        ("--workers", "2"), "study 'smoke' already exists with directions ['maximize']",
        {"optuna.db": maximized_study}),
    "storage-study-other-space": Case(
        (), "study 'smoke' already searches batch over", {"optuna.db": float_batch_study}),
    # a rerun with another --data went on in the study: trials on two datasets in one table
    "storage-study-other-data": Case(
        (), "study 'smoke' ran its trials on other data (ppg, sha256 0123456789ab) than this "
            "sweep's (synthetic at 100 Hz)",
        {"optuna.db": study_on("ppg", "0123456789ab" * 5 + "0123")}),
    "storage-study-other-data-file": Case(
        ("--data", "x.npy", *DATA), "ran its trials on other data (x.npy, sha256 "
                                    "ffffffffffff) than this sweep's (x.npy at 25 Hz, sha256",
        {"optuna.db": study_on("x.npy", "f" * 64), "x.npy": npy(pulses())}),
    "storage-old-schema": Case((), "optuna storage upgrade", {"optuna.db": old_schema_study}),
    "storage-is-an-mlflow-store": Case(
        ("--storage", "sqlite:///{tmp}/mlflow.db"), "is an MLflow store",
        {"mlflow.db": an_mlflow_store}),
    "best-storage-is-an-mlflow-store": Case(
        ("best", "--study", "smoke", "--storage", "sqlite:///{tmp}/mlflow.db"),
        "mlflow.db is an MLflow store (it holds MLflow's tables)", {"mlflow.db": an_mlflow_store},
        program="vqlog"),
    "best-tracking-wrong-scheme": Case(  # it printed the best trial, then the Error line
        ("best", "--study", "smoke", "--storage", "sqlite:///{tmp}/optuna.db",
         "--tracking-uri", "bogus://x"), "--tracking-uri must be sqlite:///FILE",
        {"optuna.db": completed_study}, program="vqlog"),
    # one new file for both: Optuna made its tables, then MLflow's migration failed on Optuna's
    # alembic_version row ("Can't locate revision"), exit 1, the file left behind
    "one-new-sqlite-file-for-both-stores": Case(
        ("--storage", "sqlite:///{tmp}/both.db", "--tracking-uri", "sqlite:///{tmp}/./both.db"),
        "the Optuna storage and the MLflow store are one database"),
    "init-one-new-sqlite-file-for-both-stores": Case(
        ("init", "--config", "smoke", "--storage", "sqlite:///{tmp}/both.db",
         "--tracking-uri", "sqlite:///{tmp}/both.db"),
        "the Optuna storage and the MLflow store are one database", program="vqlog"),
    "tracking-is-an-optuna-storage": Case(
        ("--tracking-uri", "sqlite:///{tmp}/optuna.db"), "is an Optuna storage",
        {"optuna.db": another_study}),
    "tracking-wrong-scheme": Case(("--tracking-uri", f"ftp://me:{PASSWORD}@127.0.0.1/mlflow"),
                                  "--tracking-uri must be sqlite:///FILE, a database URL or http(s)"),
    "tracking-malformed": Case(("--tracking-uri", f"http://me:{PASSWORD}@127.0.0.1:notaport/"),
                               "malformed URL"),
    "tracking-not-a-uri": Case(("--tracking-uri", "mlflow.db"), "--tracking-uri must be sqlite:///FILE"),
    "tracking-no-such-database": Case(
        ("--tracking-uri", f"postgresql://postgres:{PASSWORD}@127.0.0.1:5432/{NO_SUCH_DB}"),
        f"cannot open the MLflow store postgresql://postgres:***@127.0.0.1:5432/{NO_SUCH_DB}",
        check=no_such_db_was_not_created, timeout=20),
    "tracking-not-a-database": Case(
        ("--tracking-uri", "sqlite:///{tmp}/notes.db"), "cannot open the MLflow store",
        {"notes.db": text("my notes\n")}),
    "tracking-experiment-deleted": Case(
        (), "MLflow experiment 'smoke' is deleted", {"mlflow.db": deleted_experiment}),
    "tracking-runs-of-a-study-not-in-the-storage": Case(  # optuna.db deleted: a new study would
        (), "MLflow experiment 'smoke' holds the trial runs of a study 'smoke' that "  # share them
        "sqlite:///", {"mlflow.db": earlier_study_runs}),
    "tracking-runs-of-another-study": Case(
        (), "MLflow experiment 'smoke' holds the trial runs of another study 'smoke' than the one in",
        {"mlflow.db": earlier_study_runs, "optuna.db": study_made_anew}),
    # --- a bad default from the environment: the error names the variable, not the flag ------
    "storage-env-missing-folder": Case(
        (), "$OPTUNA_STORAGE (the default of --storage): folder",
        env={"OPTUNA_STORAGE": "sqlite:///{tmp}/nodir/optuna.db"}),
    "tracking-env-bad-scheme": Case(
        (), "$MLFLOW_TRACKING_URI (the default of --tracking-uri) must be sqlite:///FILE",
        env={"MLFLOW_TRACKING_URI": "htp://127.0.0.1:5000"}),
    "env-heartbeat-not-a-number": Case(  # a ValueError blamed on the storage, after the study line
        (), "$VQLOG_HEARTBEAT_INTERVAL must be a whole number of seconds above 0, got 'abc'",
        env={"VQLOG_HEARTBEAT_INTERVAL": "abc"}),
    "env-grace-zero": Case((), "$VQLOG_HEARTBEAT_GRACE must be a whole number of seconds above 0",
                           env={"VQLOG_HEARTBEAT_GRACE": "0"}),
    # every trial of a healthy worker failed as a dead one's between two beats, and retried
    "env-grace-within-the-interval": Case(
        (), "$VQLOG_HEARTBEAT_GRACE (2 s) must be longer than $VQLOG_HEARTBEAT_INTERVAL (10 s)",
        env={"VQLOG_HEARTBEAT_GRACE": "2", "VQLOG_HEARTBEAT_INTERVAL": "10"}),
    # init did not check them: the error blamed the storage and left optuna.db.lock behind
    "init-env-grace-not-a-number": Case(
        ("init", "--config", "smoke"),
        "$VQLOG_HEARTBEAT_GRACE must be a whole number of seconds above 0, got 'abc'",
        env={"VQLOG_HEARTBEAT_GRACE": "abc"}, program="vqlog"),
    "init-env-grace-within-the-interval": Case(  # accepted, where a sweep refused it
        ("init", "--config", "smoke"),
        "$VQLOG_HEARTBEAT_GRACE (5 s) must be longer than $VQLOG_HEARTBEAT_INTERVAL (10 s)",
        env={"VQLOG_HEARTBEAT_GRACE": "5", "VQLOG_HEARTBEAT_INTERVAL": "10"}, program="vqlog"),
    "env-db-outage-negative": Case((), "$VQLOG_DB_OUTAGE_LIMIT must be a number of seconds above 0",
                                   env={"VQLOG_DB_OUTAGE_LIMIT": "-5"}),  # it was taken as it was
    "table-env-tracking-outage": Case(  # every command: Error: ValueError ..., exit 1
        ("table", "--out", "-"), "$VQLOG_TRACKING_OUTAGE_LIMIT must be a number of seconds above 0",
        {"mlflow.db": an_mlflow_store}, env={"VQLOG_TRACKING_OUTAGE_LIMIT": "x"}, program="vqlog"),
    "tracking-unreachable-server": Case(("--tracking-uri", "http://127.0.0.1:9/"),
                                        "cannot reach the MLflow server http://127.0.0.1:9/"),
    # The part after the @ was shown whole, and then as libpq's host name ("3t@127.0.0.1")
    "storage-password-with-an-at-sign": Case(
        ("--storage", f"postgresql://postgres:{PASSWORD[:4]}@{PASSWORD[4:]}@127.0.0.1:1/db"),
        "--storage: the password in postgresql://postgres:***@127.0.0.1:1/db holds an @, which "
        "a URL must write as %40"),
    "tracking-password-with-an-at-sign": Case(
        ("--tracking-uri", f"postgresql://postgres:{PASSWORD[:4]}@{PASSWORD[4:]}@127.0.0.1/db"),
        "--tracking-uri: the password in postgresql://postgres:***@127.0.0.1/db holds an @"),
    "storage-password-as-a-parameter": Case(  # shown whole
        ("--storage", f"postgresql://postgres@127.0.0.1:1/db?password={PASSWORD}"),
        "postgresql://postgres@127.0.0.1:1/db?password=***"),
    "storage-empty": Case(("--storage", ""), "argument --storage: needs a URL, got an empty value"),
    "tracking-empty": Case(("--tracking-uri", " "),
                           "argument --tracking-uri: needs a URL, got an empty value"),
    "table-tracking-empty": Case(("table", "--tracking-uri", ""), "needs a URL, got an empty value",
                                 program="vqlog"),
    "tracking-unreachable-with-password": Case(
        ("--tracking-uri", f"http://me:{PASSWORD}@127.0.0.1:9/"),
        "cannot reach the MLflow server http://me:***@127.0.0.1:9/"),
}


# ------------------------------------------------------------------------------------ runner


def command(case: Case, folder: Path) -> list[str]:
    """The case's command line, with the smoke spec and SQLite stores inside `folder` for every
    sweep flag the case leaves out (absolute: nothing may land anywhere else)."""
    argv = [a.replace("{tmp}", str(folder)) for a in case.argv]
    if case.program == "vqlog":
        return [str(VQLOG_BIN), *argv]
    defaults = {"--config": "smoke", "--storage": f"sqlite:///{folder}/optuna.db",
                "--tracking-uri": f"sqlite:///{folder}/mlflow.db"}
    from_env = {"--storage": "OPTUNA_STORAGE", "--tracking-uri": "MLFLOW_TRACKING_URI"}
    return [str(SWEEP_BIN), *argv, *(x for k, v in defaults.items()
                                     if k not in argv and from_env.get(k) not in case.env
                                     for x in (k, v))]


def prepare(case: Case, folder: Path) -> None:
    folder.mkdir(parents=True)
    for name, write in case.files.items():
        write(folder / name)


def launch(case: Case, folder: Path, *extra: str) -> Outcome:
    start = time.monotonic()
    try:
        proc = subprocess.run([*command(case, folder), *extra], cwd=folder, capture_output=True,
                              text=True, timeout=case.timeout,
                              env={**os.environ, **SUBPROCESS_ENV,
                                   **{k: v.replace("{tmp}", str(folder)) for k, v in case.env.items()}})
        rc, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:  # killed
        rc, out, err = None, _text(exc.stdout), _text(exc.stderr) + f"\n[killed after {case.timeout:g} s]"
    return Outcome(rc, out, err, sorted(p.name for p in folder.iterdir()), time.monotonic() - start)


def _text(output: bytes | str | None) -> str:
    """What a killed process wrote (TimeoutExpired holds bytes even for text=True)."""
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


def assert_refused(case: Case, got: Outcome) -> str:
    """The contract of every case; returns the error line."""
    shown = f"exit {got.rc}\n--- stdout\n{got.stdout}--- stderr\n{got.stderr}"
    assert "Traceback" not in got.stdout + got.stderr, shown
    assert PASSWORD not in got.stdout + got.stderr, shown
    assert f"{PASSWORD[4:]}@" not in got.stdout + got.stderr, shown  # its tail, as a host name
    assert got.rc == 2, shown
    lines = got.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), shown
    assert got.stdout == "", shown  # nothing before it either (the sweep's study line)
    assert case.expect in lines[0] + "$", f"{case.expect!r} not in: {lines[0]}"
    assert got.left == sorted(case.files), f"left behind: {sorted(set(got.left) - set(case.files))}"
    return lines[0]


@pytest.fixture(scope="module")
def outcomes(request, tmp_path_factory) -> dict[str, Outcome]:
    """Every selected case, run WORKERS at a time (a single case with -k runs alone)."""
    wanted = [item.callspec.params["case"] for item in request.session.items
              if item.module is request.module
              and "case" in getattr(getattr(item, "callspec", None), "params", {})]
    root = tmp_path_factory.mktemp("bad-input")

    def run(name: str) -> Outcome:
        prepare(CASES[name], root / name)
        return launch(CASES[name], root / name)

    wanted.sort(key=lambda name: not CASES[name].bug)  # the slow ones (bugs, for now) first
    with ThreadPoolExecutor(WORKERS) as pool:
        futures = {name: pool.submit(run, name) for name in wanted}
    return {name: f.result() for name, f in futures.items()}


def test_there_are_at_least_30_cases():
    assert len(CASES) >= 30
    assert ROOT.joinpath("vqlog").is_dir() and SWEEP_BIN.is_file() and VQLOG_BIN.is_file()


def _param(name: str):
    bug = CASES[name].bug
    return pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=bug)) if bug else name


@pytest.mark.slow
@pytest.mark.parametrize("case", [_param(name) for name in CASES])
def test_bad_input_is_one_error_line_exit_2_and_nothing_created(outcomes, case):
    assert_refused(CASES[case], outcomes[case])
    if CASES[case].check is not None:
        CASES[case].check()


@pytest.mark.slow
def test_debug_adds_the_traceback_and_still_exits_2(tmp_path):
    case = CASES["data-nan-inf"]
    prepare(case, tmp_path / "debug")
    got = launch(case, tmp_path / "debug", "--debug")
    assert got.rc == 2, got.stderr
    assert "Traceback (most recent call last)" in got.stderr and "DataError" in got.stderr
    last = got.stderr.splitlines()[-1]
    assert last.startswith("Error: ") and case.expect in last, got.stderr
    assert got.left == sorted(case.files)


def test_commands_that_read_leave_an_empty_or_foreign_sqlite_file_as_it_was(tmp_path, cli):
    """An empty file given as a store to a command that only reads: MLflow made it a store
    (954 KB of tables) before the Error line; a file of other tables got MLflow's too."""
    import sqlite3

    empty = tmp_path / "e.db"
    empty.touch()
    foreign = tmp_path / "mine.db"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE samples (x REAL)")
    conn.close()
    before = foreign.read_bytes()
    for argv, message in (
            (("trials", "--tracking-uri", f"sqlite:///{empty}"), "is an empty SQLite file, not an "
             "MLflow store"),
            (("table", "--study", "x", "--tracking-uri", f"sqlite:///{empty}"), "is an empty SQLite"),
            (("ui", "--port", str(free_port()), "--tracking-uri", f"sqlite:///{empty}"),
             "is an empty SQLite file"),
            (("encode", "--model", "models:/x@best", "--data", "synthetic", "--out",
              str(tmp_path / "t.npy"), "--tracking-uri", f"sqlite:///{empty}"), "is an empty SQLite"),
            (("best", "--storage", f"sqlite:///{empty}"), "is an empty SQLite file, not an Optuna "
             "storage"),
            (("trials", "--tracking-uri", f"sqlite:///{foreign}"), "is not an MLflow store (its "
             "tables are not MLflow's)")):
        code, out, err = cli(*argv)
        assert code == 2 and err.startswith("Error: ") and message in err, (argv, err)
        assert err.count("\n") == 1, err
    assert empty.stat().st_size == 0 and foreign.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.db", "mine.db"]


@pytest.mark.slow
def test_bad_input_creates_no_study_in_a_reachable_postgresql_database(pg_storage, tmp_path):
    """The data is checked before the storage is opened: the database stays empty."""
    import psycopg2
    from sqlalchemy.engine import make_url

    storage = make_url(pg_storage).set(password=PASSWORD).render_as_string(hide_password=False)
    case = Case(("--storage", storage, "--data", "missing.npy", *DATA), "data file not found: missing.npy")
    prepare(case, tmp_path / "pg")
    assert_refused(case, launch(case, tmp_path / "pg"))
    conn = psycopg2.connect(pg_storage, connect_timeout=5)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")
            assert cur.fetchall() == []  # not even Optuna's tables
    finally:
        conn.close()


@pytest.mark.parametrize("command", [
    ["vqlog-sweep", "--config", "no-such-spec"],
    ["vqlog-sweep", "--config", "smoke", "--study", "bad/name"],
    ["vqlog", "train", "--set", "no_such_key=1"],
    ["vqlog", "train", "--set", "lr=fast"],
    ["vqlog-sweep", "--config", "smoke", "--workers", "0"],
    ["vqlog-sweep", "--config", "smoke", "--storage",
     f"postgresql://postgres@127.0.0.1:5432/{NO_SUCH_DB}"],
    ["vqlog-sweep", "--config", "smoke", "--storage", "postgresql://postgres@127.0.0.1:1/optuna"],
])
def test_a_typo_in_the_spec_or_config_is_reported_before_torch_is_imported(tmp_path, command):
    """The commonest mistakes cost a user well under a second, not torch's start-up."""
    entry = "sweep_main" if command[0] == "vqlog-sweep" else "main"
    script = (f"import sys\nfrom vqlog.cli import {entry}\ncode = {entry}({command[1:]!r})\n"
              "print('torch' in sys.modules, code)")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=tmp_path, env={**os.environ, **SUBPROCESS_ENV}, timeout=120)
    assert proc.stdout.split() == ["False", "2"], proc.stdout + proc.stderr
    (line,) = proc.stderr.splitlines()
    assert line.startswith("Error: ")
    assert list(tmp_path.iterdir()) == []

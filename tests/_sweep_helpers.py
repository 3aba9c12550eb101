"""Shared helpers of the sweep and PostgreSQL tests: specs written to tmp_path, `vqlog-sweep`
subprocesses, and a look into the real Optuna storage and MLflow store.

Not a conftest.py: the test modules import what they use.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import yaml

from vqlog.study.spec import resolve_spec_path

ROOT = Path(__file__).resolve().parents[1]
# The console script of the environment running pytest (the repo's .venv under `make test`).
SWEEP_BIN = Path(sys.executable).parent / "vqlog-sweep"
if not SWEEP_BIN.exists():  # pragma: no cover - pytest run from another interpreter
    SWEEP_BIN = ROOT / ".venv" / "bin" / "vqlog-sweep"

# Subprocesses inherit conftest.py's OMP_NUM_THREADS=1 (one torch thread per process).
SUBPROCESS_ENV = {"PYTHONUNBUFFERED": "1"}
# For tests that kill a worker: beat every 1 s, stale after 3 s (vqlog/study/storage.py reads
# these when it opens the storage). Only where one worker runs at a time: on an overloaded machine a live worker can miss
# 3 s, and another worker would fail its trial.
FAST_HEARTBEAT = {"VQLOG_HEARTBEAT_INTERVAL": "1", "VQLOG_HEARTBEAT_GRACE": "3"}


# ------------------------------------------------------------------------------------- specs


def smoke_raw() -> dict:
    """The bundled smoke spec as a mapping, to derive test specs from."""
    return yaml.safe_load(resolve_spec_path("smoke").read_text())


def write_spec(folder: Path, name: str, *, budget: dict | None = None, fixed: dict | None = None,
               space: dict | None = None, **top) -> Path:
    """A smoke-derived spec called `name` in `folder`; given sections replace or extend smoke's."""
    raw = smoke_raw()
    raw["name"] = name
    if budget is not None:
        raw["budget"] = budget
    raw["fixed"].update(fixed or {})
    if space is not None:
        raw["space"] = space
    raw.update(top)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


# ------------------------------------------------------------------------------------ MLflow


def mlflow_runs(uri: str, study: str, role: str = "trial", missing_ok: bool = False) -> list:
    """The study's MLflow runs of a role (`trial` children or the `study` parent). `missing_ok`:
    [] while the store or the experiment does not exist yet. The store is opened as vqlog opens
    it (`open_client`): a poll while a sweep is creating it must not migrate it too."""
    from vqlog.tracking.client import open_client
    from vqlog.urls import sqlite_path, with_psycopg2

    uri = with_psycopg2(uri)
    path = sqlite_path(uri)
    if missing_ok and path is not None and not path.is_file():
        return []
    client = open_client(uri)
    exp = client.get_experiment_by_name(study)
    if exp is None and missing_ok:
        return []
    assert exp is not None, f"no MLflow experiment '{study}' in {uri}"
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`vqlog.role` = '{role}'",
                              max_results=1000)


def checkpointed_runs(uri: str, study: str) -> int:
    """How many trial runs of the study hold a checkpoint (`checkpoint/latest.pt`)."""
    from mlflow.tracking import MlflowClient

    runs = mlflow_runs(uri, study, missing_ok=True)  # first: it waits for a store being created
    if not runs:  # no store yet: an MlflowClient would create it, racing the sweep that does
        return 0
    client = MlflowClient(tracking_uri=uri)
    return sum(1 for run in runs
               if any(a.path == "checkpoint/latest.pt"
                      for a in client.list_artifacts(run.info.run_id, "checkpoint")))


def has_checkpoint(uri: str, study: str) -> bool:
    """Some trial run of the study holds a checkpoint."""
    return checkpointed_runs(uri, study) > 0


def race(target: Callable, argsets: list[tuple], timeout: float = 300) -> list[str]:
    """One spawned process per tuple in `argsets`, running `target(*args, barrier, errors)`: the
    barrier, shared by all of them, lines up the calls they race with, and they put what failed
    on `errors` (a queue). Waits for them, asserts that each exited 0, and returns the failures."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    barrier, errors = ctx.Barrier(len(argsets)), ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, barrier, errors)) for args in argsets]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
    failures = []
    while not errors.empty():
        failures.append(errors.get())
    assert [p.exitcode for p in procs] == [0] * len(procs), failures
    return failures


# ------------------------------------------------------------------------------------ Optuna


def study_trials(storage_url: str, study: str) -> list:
    """Every trial of the study, read through a fresh RDBStorage (no heartbeat: read only);
    [] while the study does not exist yet."""
    import optuna
    import sqlalchemy
    from sqlalchemy.engine import make_url

    from vqlog.urls import with_psycopg2

    url = make_url(with_psycopg2(storage_url))
    if url.get_backend_name() == "sqlite" and not Path(url.database).is_file():
        return []  # do not create the file a worker is about to create
    # Only once the study exists: opening an RDBStorage writes (Optuna stamps its schema version)
    # and would race with a worker still creating the tables.
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as conn:
            exists = conn.execute(sqlalchemy.text("SELECT 1 FROM studies WHERE study_name = :n"),
                                  {"n": study}).first()
    except sqlalchemy.exc.SQLAlchemyError:  # no tables yet
        exists = None
    finally:
        engine.dispose()
    if not exists:
        return []
    storage = optuna.storages.RDBStorage(url.render_as_string(hide_password=False),
                                         skip_compatibility_check=True, skip_table_creation=True)
    try:
        return storage.get_all_trials(storage.get_study_id_from_name(study), deepcopy=False)
    finally:
        storage.engine.dispose()


def retried_from(trial) -> int | None:
    """The number of the failed trial this one retries (Optuna's RetryHeartbeatStaleTrialCallback)."""
    import warnings

    from optuna.storages import RetryHeartbeatStaleTrialCallback

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ExperimentalWarning
        return RetryHeartbeatStaleTrialCallback.retried_trial_number(trial)


def states(trials: list) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in trials:
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


def finished(trials: list) -> list:
    return [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]


# ----------------------------------------------------------------------------- subprocesses


class Worker:
    """One `vqlog-sweep` process; its output goes to files (a full pipe would block it)."""

    def __init__(self, args: list[str], cwd: Path, name: str = "worker", env: dict | None = None,
                 start_new_session: bool = False):
        """`start_new_session`: a process group of its own, to signal it as a terminal does."""
        self.cwd, self.name = cwd, name
        cwd.mkdir(parents=True, exist_ok=True)
        self.out_path, self.err_path = cwd / f"{name}.out", cwd / f"{name}.err"
        full_env = {**os.environ, **SUBPROCESS_ENV, **(env or {})}
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen([str(SWEEP_BIN), *args], cwd=cwd, stdout=out, stderr=err,
                                         env=full_env, start_new_session=start_new_session)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"{self.name} did not finish in {timeout:.0f} s\n{self.output()}")

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def preempt(self) -> None:
        """SIGTERM, as `docker compose stop`, Kubernetes and Slurm send it: the worker must
        checkpoint and exit 143 within 30 s."""
        sent = time.monotonic()
        self.signal(signal.SIGTERM)
        assert self.wait(60) == 143, self.output()
        assert time.monotonic() - sent < 30

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    @property
    def stdout(self) -> str:
        return self.out_path.read_text()

    @property
    def stderr(self) -> str:
        return self.err_path.read_text()

    def output(self) -> str:
        return f"--- {self.name} stdout\n{self.stdout}\n--- {self.name} stderr\n{self.stderr}"


def stopped(pid: int) -> bool:
    """Whether the process is stopped (SIGSTOP, as a failpoint NAME:N:SIGSTOP stops it): its
    state in /proc is T."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] == "T"


def wait_until(predicate: Callable[[], object], timeout: float, what: str,
               alive: list[Worker] = (), interval: float = 0.25):
    """Poll `predicate` until truthy; fail (with the workers' output) on timeout or if a worker
    it depends on exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        for w in alive:
            if w.proc.poll() is not None:
                pytest.fail(f"{w.name} exited ({w.proc.returncode}) while waiting for {what}\n"
                            f"{w.output()}")
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n"
                + "\n".join(w.output() for w in alive))

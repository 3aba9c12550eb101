"""The compose stack's topology, run natively: throw-away PostgreSQL databases on the machine's
server, the MLflow server started by the image's own `mlflow/start.sh`, `vqlog init` (the compose
`init` service) and `vqlog-sweep` worker processes.

    with populated_stack(folder) as stack: ...     # conftest.py's session fixture `stack`
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

from _servers import BIN, Server, mlflow_via_start_sh, stop_group

# The admin URL of the machine's PostgreSQL (VQLOG_TEST_POSTGRES overrides).
ADMIN_URL = os.environ.get("VQLOG_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
SWEEP_TIMEOUT = 300.0
STACK_TRIALS = 3


def skip_or_fail(reason: str) -> None:
    """Skip where the machine lacks a service; in CI (env CI set) the same is a failure."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so this fails instead of skipping)")
    pytest.skip(reason)


def _pg() -> dict:
    from sqlalchemy.engine import make_url

    url = make_url(ADMIN_URL)
    return {"host": url.host or "127.0.0.1", "port": url.port or 5432,
            "user": url.username or "postgres", "password": url.password}


def base_env(**extra: str) -> dict[str, str]:
    """The test process's environment with the venv's scripts first on PATH (and, as in the
    compose file, any database password for libpq in PGPASSWORD rather than in URLs)."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONUNBUFFERED": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    if _pg()["password"]:
        env["PGPASSWORD"] = _pg()["password"]
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                "MLFLOW_AUTH", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY",
                "OPTUNA_STORAGE"):
        env.pop(key, None)
    env.update(extra)
    return env


# ------------------------------------------------------------------------------ PostgreSQL


def _admin_connect():
    import psycopg2

    return psycopg2.connect(ADMIN_URL, connect_timeout=5)


def require_postgres() -> None:
    try:
        _admin_connect().close()
    except Exception as exc:  # noqa: BLE001 - any connection problem means "no server here"
        pg = _pg()
        skip_or_fail(f"no PostgreSQL at {pg['user']}@{pg['host']}:{pg['port']} "
                     f"({' '.join(str(exc).split())[:200]})")


@contextlib.contextmanager
def throwaway_databases(*roles: str) -> Iterator[dict[str, str]]:
    """Fresh databases, one per role (e.g. 'mlflow', 'optuna'); dropped afterwards."""
    require_postgres()
    tag = uuid.uuid4().hex[:10]
    names = {role: f"vqlog_test_{tag}_{role}" for role in roles}
    conn = _admin_connect()
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            for name in names.values():
                cur.execute(f'CREATE DATABASE "{name}"')
        yield names
    finally:
        with conn.cursor() as cur:
            for name in names.values():
                cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.close()


def pg_url(database: str) -> str:
    """A password-free URL, as in the compose file: libpq takes the password from PGPASSWORD."""
    pg = _pg()
    return f"postgresql://{pg['user']}@{pg['host']}:{pg['port']}/{database}"


def start_sh_env(mlflow_db: str, **extra: str) -> dict[str, str]:
    """The environment the compose file gives the mlflow service, pointed at this machine."""
    pg = _pg()
    env = base_env(POSTGRES_HOST=pg["host"], POSTGRES_PORT=str(pg["port"]),
                   POSTGRES_USER=pg["user"], MLFLOW_DB=mlflow_db, **extra)
    env.pop("PGPASSWORD", None)  # start.sh takes POSTGRES_PASSWORD, as the compose file gives it
    if pg["password"]:
        env["POSTGRES_PASSWORD"] = pg["password"]
    return env


# ------------------------------------------------------------------------ the populated stack


@dataclass
class Stack:
    server: Server
    storage: str  # Optuna storage URL
    study: str
    folder: Path
    init_output: str
    worker_outputs: list[str] = field(default_factory=list)
    worker_codes: list[int] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.server.url


@contextlib.contextmanager
def populated_stack(folder: Path) -> Iterator[Stack]:
    """Databases, the server by start.sh, `vqlog init` once, then two workers at the same time
    (the compose stack's order); everything is stopped and dropped afterwards."""
    require_postgres()
    if _pg()["password"]:  # the tests' own clients use the same password-free URLs
        os.environ.setdefault("PGPASSWORD", _pg()["password"])
    with throwaway_databases("mlflow", "optuna") as dbs, \
            mlflow_via_start_sh(folder / "mlflow", start_sh_env(dbs["mlflow"])) as server:
        yield _populate(server, pg_url(dbs["optuna"]), folder)


def _populate(server: Server, storage: str, folder: Path) -> Stack:
    study = f"stack-{uuid.uuid4().hex[:6]}"
    common = ["--config", "smoke", "--study", study, "--storage", storage,
              "--tracking-uri", server.url]
    env = base_env()
    init = subprocess.run([str(BIN / "vqlog"), "init", *common], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=180)
    if init.returncode != 0:
        raise RuntimeError(f"vqlog init failed ({init.returncode}):\n{init.stdout}\n{init.stderr}")
    stack = Stack(server, storage, study, folder, init.stdout + init.stderr)
    procs, logs = [], []
    for i in range(2):
        wdir = folder / f"worker{i}"  # each worker writes its own results/<study>.md
        wdir.mkdir()
        log = wdir / "out.log"
        logs.append(log)
        with open(log, "wb") as out:
            procs.append(subprocess.Popen(
                [str(BIN / "vqlog-sweep"), "--trials", str(STACK_TRIALS), *common, "--seed", str(i)],
                cwd=wdir, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
    deadline = time.monotonic() + SWEEP_TIMEOUT
    try:
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        for proc in procs:
            stop_group(proc, timeout=10)
        raise RuntimeError("sweep workers did not finish in time:\n"
                           + "\n".join(log.read_text()[-2000:] for log in logs)) from None
    stack.worker_codes = [p.returncode for p in procs]
    stack.worker_outputs = [log.read_text(errors="replace") for log in logs]
    return stack


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None

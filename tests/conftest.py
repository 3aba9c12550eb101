"""Shared test setup: the fixtures several test modules use.

- `tiny`: a factory of tiny training configurations (the same base everywhere, with overrides);
- `cli`: `vqlog ...` or `vqlog-sweep ...` run in-process, giving (exit code, stdout, stderr);
- `free_port`, `mlflow_server`: real `mlflow server` processes (tests/_servers.py);
- `mlflow_store`: a fresh embedded MLflow store, cheap;
- `stack`: the compose topology run natively and populated once per session (tests/_stack.py);
- `pg_database`, `pg_storage`: throw-away databases on the machine's PostgreSQL.
"""

import contextlib
import os
import shutil
import sys

import pytest

# The tiny model every fast test trains: d_model 8, one S4D block, windows of 32 samples.
TINY = dict(batch=8, d_model=8, d_state=8, n_layers=1, window=32, stride=32, embedding_dim=8,
            embedding_num=16, iteration=12, eval_every=5, log_every=4, warmup=3, lr=5e-3,
            quantizer="vq")


def pytest_configure(config):
    # One intra-op thread. The tests run tiny models on a shared 2-core machine, where two
    # spinning OpenMP threads per process and other processes on the cores made a tiny step many
    # times slower. Set before torch starts its pool; a value the caller exported
    # (OMP_NUM_THREADS=2 pytest) is kept.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if "torch" in sys.modules:  # imported early by a plugin: the variable came too late
        sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Each test, with its fixtures' setup and teardown, leaves os.environ as it found it.

    A command run in-process sets process-wide variables (`configure_process`: MLflow's log
    level, its HTTP retries, its progress bar), and a module fixture that runs one did so for
    every later test: a child process those tests started inherited them and behaved unlike a
    user's. The snapshot is taken before the item's setup, so a module fixture's command is
    undone after the first test that used it; no fixture here sets variables for later tests."""
    environ = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(environ)


@pytest.fixture(scope="session")
def tiny():
    """`tiny(**overrides)`: a tiny Config (TINY above, then the overrides, log names allowed);
    `tiny.args(**overrides)`: the same as `--set key=value` arguments for `vqlog train`."""
    from vqlog.config import Config

    def make(**overrides):
        return Config.from_mapping({**TINY, **overrides})

    def args(**overrides) -> list[str]:
        return [x for key, value in {**TINY, **overrides}.items()
                for x in ("--set", f"{key}={value}")]

    make.args = args
    return make


@pytest.fixture
def cli(capsys):
    """`cli("train", ...)` runs `vqlog train ...` in-process, `cli.sweep(...)` runs
    `vqlog-sweep ...`; each returns (exit code, stdout, stderr), also when argparse exits."""
    from vqlog.cli import main, sweep_main

    def call(entry, args) -> tuple[int, str, str]:
        capsys.readouterr()  # what came before is not this command's
        environ = dict(os.environ)  # a command sets process-wide variables (configure_process)
        try:
            code = entry(list(args))
        except SystemExit as exc:
            code = exc.code
        finally:
            os.environ.clear()
            os.environ.update(environ)
        out, err = capsys.readouterr()
        return code, out, err

    def run(*args: str):
        return call(main, args)

    run.sweep = lambda *args: call(sweep_main, args)
    return run


@pytest.fixture(scope="session")
def free_port():
    """A function: a 127.0.0.1 port nothing listens on right now."""
    from _servers import free_port as find

    return find


@pytest.fixture(scope="session")
def mlflow_server():
    """The `mlflow server` launcher of tests/_servers.py: `with mlflow_server(folder) as s:`."""
    from _servers import mlflow_server as launch

    return launch


_STORE_TEMPLATE: list = []


@pytest.fixture
def mlflow_store(tmp_path, tmp_path_factory):
    """`mlflow_store(folder=tmp_path)`: `sqlite:///<folder>/mlflow.db`, a copy of one store MLflow
    created (and migrated) for this session: creating a store runs ~40 alembic migrations,
    seconds on a shared machine."""

    def make(folder=None) -> str:
        if not _STORE_TEMPLATE:
            from mlflow.tracking import MlflowClient

            template = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
            MlflowClient(tracking_uri=f"sqlite:///{template}").search_experiments()
            _STORE_TEMPLATE.append(template)
        folder = folder or tmp_path
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_STORE_TEMPLATE[0], folder / "mlflow.db")
        return f"sqlite:///{folder / 'mlflow.db'}"

    return make


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    """One populated stack (PostgreSQL, start.sh's server, `vqlog init`, two workers) for
    test_stack.py and test_browser.py."""
    from _stack import populated_stack

    with populated_stack(tmp_path_factory.mktemp("stack")) as s:
        yield s


@pytest.fixture
def pg_database():
    """A factory of fresh databases on the machine's PostgreSQL, as URLs; dropped after the test.
    Skips without a server, fails where CI is set (tests/_stack.py)."""
    from _stack import ADMIN_URL, throwaway_databases
    from sqlalchemy.engine import make_url

    with contextlib.ExitStack() as stack:
        def create() -> str:
            (name,) = stack.enter_context(throwaway_databases("db")).values()
            return make_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False)

        yield create


@pytest.fixture
def pg_storage(pg_database) -> str:
    """One fresh PostgreSQL database URL for the test."""
    return pg_database()

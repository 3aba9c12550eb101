"""Shared test setup. Keep this file to small, generic pieces."""

import contextlib
import os
import sys

import pytest


def pytest_configure(config):
    # One intra-op thread. The tests run tiny models (d_model 8) on a shared 2-core machine;
    # with two OpenMP threads and other processes on the cores, a tiny forward+backward measured
    # ~400 ms instead of ~8 ms (spinning threads waiting for a core). Set before torch starts its
    # pool; a value the caller exported (OMP_NUM_THREADS=2 pytest) is kept.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if "torch" in sys.modules:  # imported early by a plugin: the variable came too late
        sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


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

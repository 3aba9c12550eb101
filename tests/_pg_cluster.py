"""A private PostgreSQL cluster for tests that restart or stop the server: `initdb` into a
temporary folder, `pg_ctl start` on a free port, and stop + remove at the end. The machine's own
server is never touched.

    with private_cluster() as pg:          # skips without PostgreSQL's binaries (fails under CI)
        url = pg.create_database("study")
        pg.restart()                       # `pg_ctl restart -m fast`: every session is terminated

initdb and postgres refuse to run as root; as root the commands run as the `postgres` OS user
(`runuser`), in a folder that user owns.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

from _servers import free_port

# VQLOG_TEST_PG_BIN: the folder with initdb and pg_ctl; otherwise PATH, then Debian's layout.
BIN_ENV = "VQLOG_TEST_PG_BIN"


def pg_bindir() -> Path | None:
    """The folder holding initdb and pg_ctl, or None where PostgreSQL is not installed."""
    candidates = [os.environ.get(BIN_ENV, "")]
    which = shutil.which("pg_ctl")
    if which:
        candidates.append(str(Path(which).parent))
    # Debian/Ubuntu keep the server binaries off PATH: /usr/lib/postgresql/<major>/bin, newest first
    debian = glob.glob("/usr/lib/postgresql/*/bin")
    candidates += sorted(debian, key=lambda p: int("0" + re.sub(r"\D", "", Path(p).parent.name)),
                         reverse=True)
    for folder in filter(None, candidates):
        if all((Path(folder) / exe).is_file() for exe in ("initdb", "pg_ctl", "postgres")):
            return Path(folder)
    return None


class PgCluster:
    """One `initdb` cluster under `root` (data in root/data, socket and log in root)."""

    def __init__(self, bindir: Path, root: Path, user: str | None):
        self.bindir, self.root, self.user = bindir, root, user
        self.data, self.log = root / "data", root / "server.log"
        self.port = free_port()
        self._options = (f"-p {self.port} -k {root} -c listen_addresses=127.0.0.1 "
                         "-c fsync=off -c full_page_writes=off")  # throw-away data: no durability

    def _run(self, *args: str, timeout: float = 60) -> None:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self.user:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): "
                               f"{proc.stderr.strip() or proc.stdout.strip()}\n{self.log_tail()}")

    def init(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync",
                  "--no-instructions", "-E", "UTF8", "--locale=C")

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", self._options,
                  "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def restart(self, mode: str = "fast", downtime: float = 0) -> None:
        """Stop (`fast`: every session is terminated, open transactions roll back) and start
        again, after `downtime` seconds with the server down."""
        if downtime:
            self.stop(mode)
            time.sleep(downtime)
            self.start()
        else:
            self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", self._options,
                      "-m", mode, "-w", "-t", "60", "restart")

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        import psycopg2

        conn = psycopg2.connect(self.url(), connect_timeout=10)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()
        return self.url(name)

    def log_tail(self, lines: int = 20) -> str:
        if not self.log.is_file():
            return ""
        tail = self.log.read_text(errors="replace").splitlines()[-lines:]
        return "--- server log\n" + "\n".join(tail)


@contextlib.contextmanager
def private_cluster() -> Iterator[PgCluster]:
    """A started private cluster, stopped and removed afterwards. Skips where PostgreSQL's server
    binaries are missing; fails instead when the environment variable CI is set."""
    bindir = pg_bindir()
    if bindir is None:
        reason = (f"no PostgreSQL server binaries (initdb, pg_ctl, postgres) on PATH, in "
                  f"/usr/lib/postgresql/*/bin or in ${BIN_ENV}")
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (CI is set: the database outage tests must run)")
        pytest.skip(reason)
    user = None
    if os.geteuid() == 0:  # initdb and postgres refuse root: run them as the postgres user
        user = "postgres"
        try:
            owner = pwd.getpwnam(user)
        except KeyError:
            message = "running as root and there is no 'postgres' OS user to run initdb as"
            if os.environ.get("CI"):
                pytest.fail(message)
            pytest.skip(message)
    # Not pytest's tmp_path (nor $TMPDIR): its parents may be private to root. A short path also
    # keeps the unix socket's path under its 107-byte limit.
    root = Path(tempfile.mkdtemp(prefix="vqlog-pg-", dir="/tmp"))
    if user:
        os.chown(root, owner.pw_uid, owner.pw_gid)
    cluster = PgCluster(bindir, root, user)
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        if cluster.running():
            with contextlib.suppress(Exception):
                cluster.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)

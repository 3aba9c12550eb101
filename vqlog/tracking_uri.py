"""Tracking URIs: checked before any study or run exists, so that a wrong one is one `Error:`
line (exit 2) instead of minutes of MLflow retries after the Optuna study was created."""

from __future__ import annotations

from pathlib import Path

from vqlog.errors import UserError
from vqlog.storage import mask

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DB_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")


def check_tracking_uri(uri: str) -> None:
    """Fail before the first trial when the tracking URI cannot work (exit 2, password masked)."""
    scheme = uri.split(":", 1)[0].split("+", 1)[0].lower() if ":" in uri else ""
    if scheme in ("http", "https"):
        import http.client
        import urllib.error
        import urllib.request

        try:
            health = _health_request(uri)
            with urllib.request.urlopen(health, timeout=5) as resp:  # noqa: S310 - user's server
                if resp.status != 200:
                    raise OSError(f"HTTP {resp.status}")
        except urllib.error.HTTPError as exc:
            if exc.code != 401:  # basic-auth servers guard /health too; the server is up
                raise UserError(f"MLflow server {mask(uri)} answered HTTP {exc.code} on /health") from None
        except (OSError, ValueError, http.client.HTTPException) as exc:
            reason = _short(exc)
            secret = _password(uri)
            if secret and not isinstance(exc, OSError):
                # urllib's message on a malformed URI can quote a piece of the password
                # ("nonnumeric port: 'pa'" for user:pa/ss@host): say what is wrong instead.
                reason = "malformed URL; percent-encode / ? # @ : in the user name and password"
            elif secret:
                reason = reason.replace(secret, "***")
            raise UserError(
                f"cannot reach the MLflow server {mask(uri)} ({reason}); start it or pass "
                "another --tracking-uri"
            ) from None
    elif scheme == "sqlite":
        path = uri.split(":///", 1)[1] if ":///" in uri else ""
        if not path:
            raise UserError(f"--tracking-uri {uri} needs a file, e.g. sqlite:///mlflow.db")
        folder = Path(path).expanduser().resolve().parent
        if not folder.is_dir():
            raise UserError(f"--tracking-uri: folder {folder} for the SQLite file does not exist")
        if Path(path.split("?", 1)[0]).expanduser().exists():  # a new file is created later
            _check_database(uri)
    elif scheme in DB_SCHEMES:
        _check_database(uri)
    else:
        raise UserError(
            f"--tracking-uri must be sqlite:///FILE, a database URL or http(s)://HOST:PORT; "
            f"got {mask(uri)}"
        )


def _check_database(uri: str) -> None:
    """Connect once before any study exists: a missing database or a file that is not one is
    bad input (MLflow would retry for minutes, then fail after the Optuna study was created)."""
    import sqlalchemy

    engine = None
    try:
        postgres = uri.startswith("postgresql")
        engine = sqlalchemy.create_engine(
            with_driver(uri), poolclass=sqlalchemy.pool.NullPool,
            connect_args={"connect_timeout": 10} if postgres else {},
        )
        with engine.connect() as conn:
            if uri.startswith("sqlite"):
                conn.execute(sqlalchemy.text("SELECT count(*) FROM sqlite_master"))
    except Exception as exc:  # noqa: BLE001 - driver, auth, missing database, not a database
        reason = " ".join(str(getattr(exc, "orig", None) or exc).split())[:200]
        secret = _password(uri)
        if secret:
            reason = reason.replace(secret, "***")
        raise UserError(
            f"cannot open the MLflow store {mask(uri)}: {reason}; create it or pass another "
            "--tracking-uri"
        ) from None
    finally:
        if engine is not None:
            engine.dispose()


def _health_request(uri: str):
    """GET <uri>/health. Credentials in the URI (http://user:password@host) go in a Basic auth
    header, as MLflow's client (requests) sends them; urllib would take `user:password@host` for
    the host name and fail with 'Name or service not known'."""
    import base64
    import urllib.parse
    import urllib.request

    parts = urllib.parse.urlsplit(uri)
    host = parts.netloc.rpartition("@")[2]
    path = parts.path.rstrip("/") + "/health"
    request = urllib.request.Request(urllib.parse.urlunsplit((parts.scheme, host, path, "", "")))
    if parts.username is not None or parts.password is not None:
        user = urllib.parse.unquote(parts.username or "")
        password = urllib.parse.unquote(parts.password or "")
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    return request


def _password(uri: str) -> str:
    userinfo = uri.partition("://")[2].rpartition("@")[0]
    return userinfo.partition(":")[2]


def _short(exc: BaseException) -> str:
    return " ".join(str(getattr(exc, "reason", None) or exc).split())[:200]


def with_driver(uri: str) -> str:
    """A bare postgresql:// store through psycopg2, the driver vqlog ships (SQLAlchemy 2.1
    defaults to psycopg 3)."""
    return "postgresql+psycopg2://" + uri[len("postgresql://"):] if uri.startswith("postgresql://") else uri


def absolute_sqlite_uri(uri: str) -> str:
    """`sqlite:///mlflow.db` -> `sqlite:////abs/folder/mlflow.db`, resolved against the working
    directory now. MLflow caches its store by the URI's text, so a process that changes folder
    would keep writing a relative URI's runs to the first folder's database while their artifacts
    (located from the current folder) went to the new one."""
    if not uri.startswith("sqlite:///"):
        return uri
    path, sep, query = uri[len("sqlite:///"):].partition("?")
    if not path or path == ":memory:" or path.startswith("/"):
        return uri
    return f"sqlite:///{Path(path).expanduser().resolve()}{sep}{query}"

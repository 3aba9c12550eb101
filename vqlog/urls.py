"""Database and server URLs as users give them: masking secrets, the PostgreSQL driver, and
SQLite paths. Used by both the study (Optuna storage) and the tracking (MLflow) wings.

Never print a URL except through `mask`, and never print a library's message that may quote one
except through `mask_urls`.
"""

from __future__ import annotations

import re
from pathlib import Path

# `scheme://user:secret@`: the secret runs to the last @ of the word, so a password with an
# unescaped @ (which requests and libpq read that way) is hidden whole.
_USERINFO_SECRET = re.compile(r"(\w[\w+.-]*://[^/@:\s]*):\S*@")
# `?password=secret` or `&sslpassword=secret`: libpq's other way of giving a password.
_QUERY_SECRET = re.compile(r"([?&](?:ssl)?password=)[^&\s]*", re.IGNORECASE)
# `scheme:/user:secret@`, `user:secret@host` (no //, or no scheme: not a URL to parse, but the
# secret is no less one)
_LOOSE_SECRET = re.compile(r"^((?:[\w+.-]+:/{0,2})?[^:@/\s]*):.*@")


def mask(url: str) -> str:
    """The URL with its password replaced by ***: the one between `user:` and the last @, and
    a `password=` query parameter."""
    head, sep, rest = url.partition("://")
    if sep and "@" in rest:
        userinfo, _, host = rest.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        url = f"{head}://{user}{':***' if colon else ''}@{host}"
    elif "@" in url:
        url = _LOOSE_SECRET.sub(r"\1:***@", url)
    return _QUERY_SECRET.sub(r"\1***", url)


def check_at_signs(url: str, what: str) -> None:
    """A URL whose host part holds more than one @: a password with an @ not written %40.
    The drivers split it at the first @ and quote the rest of the password as the host name in
    their errors ("could not translate host name "3t@db""), which no masking can tell apart."""
    from vqlog.errors import UserError

    authority = re.split(r"[/?#]", url.partition("://")[2], maxsplit=1)[0]
    userinfo = authority.rpartition("@")[0]  # a user name may hold an @ (user@server:pw@host)
    if "@" in userinfo.partition(":")[2]:
        raise UserError(f"{what}: the password in {mask(url)} holds an @, which a URL must "
                        "write as %40 (user:pa%40ss@host)")


def mask_urls(text: str) -> str:
    """Every `scheme://user:secret@` and `password=secret` parameter in free text (a library's
    error message) with *** for the secret."""
    return _QUERY_SECRET.sub(r"\1***", _USERINFO_SECRET.sub(r"\1:***@", text))


def without_password(url: str) -> str:
    """The URL with no password at all (where `mask` puts ***): a command line a user can copy
    and run, with the password from $PGPASSWORD (libpq's)."""
    head, sep, rest = url.partition("://")
    if sep and "@" in rest:
        userinfo, _, host = rest.rpartition("@")
        url = f"{head}://{userinfo.partition(':')[0]}@{host}"
    base, mark, query = url.partition("?")
    if mark:
        kept = [p for p in query.split("&") if not re.match(r"(?:ssl)?password=", p, re.I)]
        url = base + ("?" + "&".join(kept) if kept else "")
    return url


def password(url: str) -> str:
    """The password part of `scheme://user:password@host`, or ""."""
    userinfo = url.partition("://")[2].rpartition("@")[0]
    return userinfo.partition(":")[2]


def with_psycopg2(url: str) -> str:
    """A bare `postgresql://` URL with psycopg2 as its driver. SQLAlchemy 2.1 made psycopg (3) the
    default driver of a bare `postgresql://`, but vqlog ships psycopg2-binary: without this, every
    PostgreSQL URL failed with "Failed to import DB access module". An explicit
    `postgresql+driver://` is kept."""
    prefix = "postgresql://"
    return "postgresql+psycopg2://" + url[len(prefix):] if url.startswith(prefix) else url


def sqlite_path(url: str) -> Path | None:
    """The file of a `sqlite:///FILE` URL (query string dropped), or None for other URLs."""
    if not url.startswith("sqlite:///"):
        return None
    path = url[len("sqlite:///"):].split("?", 1)[0]
    return Path(path).expanduser() if path else None


def expand_sqlite_home(url: str) -> str:
    """`sqlite:///~/optuna.db` -> `sqlite:////home/me/optuna.db`: SQLAlchemy opens a `~` path as
    a folder named `~` in the working directory, which is not what a user typing it means."""
    if not url.startswith("sqlite:///~"):
        return url
    path, sep, query = url[len("sqlite:///"):].partition("?")
    return f"sqlite:///{Path(path).expanduser()}{sep}{query}"


def absolute_sqlite(url: str) -> str:
    """`sqlite:///mlflow.db` -> `sqlite:////abs/folder/mlflow.db`, resolved against the working
    directory now. MLflow caches its store by the URI's text, so a process that changes folder
    would keep writing a relative URI's runs to the first folder's database while their artifacts
    (located from the current folder) went to the new one."""
    if not url.startswith("sqlite:///"):
        return url
    path, sep, query = url[len("sqlite:///"):].partition("?")
    if not path or path == ":memory:" or path.startswith("/"):
        return url
    return f"sqlite:///{Path(path).expanduser().resolve()}{sep}{query}"


def same_database(a: str, b: str) -> bool:
    """Whether two database URLs name one database: one SQLite file (however it is spelt, with
    or without a driver), or one database of one server (the driver, the user and the options
    aside; a host or port given as a query parameter, as libpq takes them, counts)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    def where(url: str) -> tuple | None:
        try:
            u = make_url(url)
        except ArgumentError:
            return None
        backend = u.get_backend_name()
        if backend == "sqlite":
            if not u.database or u.database == ":memory:":
                return None
            return backend, str(Path(u.database).expanduser().resolve())
        if backend in ("http", "https"):
            return None
        host, port = u.query.get("host", u.host), u.query.get("port", u.port)
        default = {"postgresql": 5432, "mysql": 3306}.get(backend)
        return backend, str(host or "localhost").lower(), str(port or default), u.database

    x = where(a)
    return x is not None and x == where(b)


def missing_store_fix(given: str | None, flag: str, env: str) -> str:
    """What to do about a store a reading command did not find, by where its URL came from:
    `given` with the flag, else the environment variable, else the default (a sweep run in
    another folder)."""
    import os

    if given is not None:
        return f"check {flag}, or run vqlog-sweep first"
    if os.environ.get(env):
        return f"check ${env} (the default of {flag}), or run vqlog-sweep first"
    return f"run vqlog-sweep first (here, in {Path.cwd()}) or pass {flag}"

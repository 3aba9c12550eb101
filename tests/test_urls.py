"""Passwords in URLs as users write them never reach output whole: `mask` (a URL vqlog prints),
`mask_urls` (a library's message quoting one), `without_password` (a command line to copy)."""

import pytest

from vqlog.urls import mask, mask_urls, without_password

SECRET = "pa55word"


@pytest.mark.parametrize("url, shown", [
    (f"postgresql://me:{SECRET}@db:5432/optuna", "postgresql://me:***@db:5432/optuna"),
    (f"postgresql://me:pa@{SECRET}@db/optuna", "postgresql://me:***@db/optuna"),  # an unescaped @
    (f"http://me:pa/{SECRET}@host:5000", "http://me:***@host:5000"),  # an unescaped /
    (f"postgresql://me@db/optuna?password={SECRET}&sslmode=require",
     "postgresql://me@db/optuna?password=***&sslmode=require"),
    (f"postgresql://me@db/optuna?sslpassword=a'{SECRET}#x", "postgresql://me@db/optuna?sslpassword=***"),
    (f"postgresql:/me:{SECRET}@db/optuna", "postgresql:/me:***@db/optuna"),  # one slash: no URL
    (f"me:{SECRET}@db/optuna", "me:***@db/optuna"),  # no scheme
    ("postgresql://me@db/optuna", "postgresql://me@db/optuna"),
    ("sqlite:///folder/a@b.db", "sqlite:///folder/a@b.db"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
])
def test_mask_hides_every_password_and_keeps_the_rest(url, shown):
    assert mask(url) == shown
    if "://" in url:  # a library's message quotes the URLs it was given, all of them with ://
        assert SECRET not in mask_urls(f"could not connect to {url} (timeout)")


@pytest.mark.parametrize("url, copied", [
    (f"postgresql+psycopg2://me:{SECRET}@db:5432/optuna", "postgresql+psycopg2://me@db:5432/optuna"),
    (f"postgresql://me@db/optuna?password={SECRET}&sslmode=require",
     "postgresql://me@db/optuna?sslmode=require"),
    (f"postgresql://me@db/optuna?password={SECRET}", "postgresql://me@db/optuna"),
    ("sqlite:///optuna.db", "sqlite:///optuna.db"),
])
def test_without_password_leaves_a_url_that_opens_with_the_password_given_elsewhere(url, copied):
    assert without_password(url) == copied


@pytest.mark.parametrize("key", ["storage", "tracking_uri"])
def test_an_empty_url_from_python_is_refused_not_the_default(tmp_path, monkeypatch, key):
    """vqlog.sweep(storage="") (an unset variable) ran a study of its own in ./optuna.db."""
    import vqlog
    from vqlog.errors import UserError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=f"{key} needs a URL, got an empty value"):
        vqlog.sweep(trials=1, config="smoke", **{key: ""})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("a, b, same", [
    ("sqlite:///both.db", "sqlite:///./both.db", True),
    ("sqlite:///both.db", "sqlite:///{cwd}/both.db", True),
    ("sqlite:///optuna.db", "sqlite:///mlflow.db", False),
    ("sqlite:///optuna.db", "postgresql://u@h/optuna.db", False),
    ("postgresql://u:pw@db:5432/vqlog", "postgresql+psycopg2://other@DB:5432/vqlog?sslmode=require",
     True),
    ("postgresql://u@db/optuna", "postgresql://u@db/mlflow", False),
    ("postgresql://u@db/x", "postgresql://u@db:5432/x", True),  # the default port
    ("sqlite+pysqlite:///both.db", "sqlite:///both.db", True),  # a driver named
    ("postgresql://u@/x?host=/run/pg1", "postgresql://u@/x?host=/run/pg2", False),  # two servers
    ("postgresql://u@/x?host=/run/pg1&port=5433", "postgresql://u@/x?port=5433&host=/run/pg1",
     True),
    ("sqlite:///:memory:", "sqlite:///:memory:", False),
    ("postgresql://u@db:5432/x", "postgresql://u@db:5433/x", False),
    ("postgresql://u@db/x", "http://db:5000", False),
])
def test_one_database_however_it_is_spelt(a, b, same, tmp_path, monkeypatch):
    from vqlog.urls import same_database

    monkeypatch.chdir(tmp_path)
    assert same_database(a, b.format(cwd=tmp_path)) is same


def test_a_storage_under_the_home_folder_opens_there(tmp_path, monkeypatch):
    """`--storage sqlite:///~/optuna.db` was checked with its `~` expanded, then opened by
    SQLAlchemy as a folder named `~` in the working directory: "unable to open database file"."""
    from vqlog.study.storage import open_storage, resolve_storage

    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    url = resolve_storage("sqlite:///~/optuna.db?timeout=5")
    assert url == f"sqlite:///{home}/optuna.db?timeout=5"
    storage = open_storage(url)
    storage.engine.dispose()
    assert (home / "optuna.db").stat().st_size > 0 and list(work.iterdir()) == []


@pytest.mark.parametrize("url", [
    "postgresql://me@srv:pw@host/db",  # a user name with an @ (Azure's user@server): SQLAlchemy's
    "postgresql://me:pw@host?application_name=a@b",  # an @ in the query, no path
    "postgresql://me:pw@host/db@x",
    "sqlite:////tmp/a@b/optuna.db",
    "http://me:pw@host:5000/#/experiments/1@x",
])
def test_an_at_sign_outside_the_password_is_no_error(url):
    from vqlog.urls import check_at_signs

    check_at_signs(url, "--storage")


def test_a_password_with_an_unwritten_at_sign_is_named_with_the_fix():
    from vqlog.errors import UserError
    from vqlog.urls import check_at_signs

    with pytest.raises(UserError, match=r"^--storage: the password in postgresql://me:\*\*\*@db/x "
                                        r"holds an @, which a URL must write as %40"):
        check_at_signs("postgresql://me:pa@ss@db/x", "--storage")

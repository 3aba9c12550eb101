"""A sweep's first look at a study that may exist already: what `storage.open_study` would
refuse, found before the sweep says anything, with nothing created or written."""

from __future__ import annotations

from pathlib import Path

import optuna
import sqlalchemy
from sqlalchemy.engine import URL

from vqlog.errors import UserError
from vqlog.study.outage import is_connection_error, root_cause
from vqlog.study.space import check_space
from vqlog.study.storage import check_directions, engine_kwargs, parse_url, read_only_storage
from vqlog.urls import mask, with_psycopg2


def check_study(spec, url: str) -> None:
    """What `open_study` would refuse in a study of the spec's name that exists already: other
    directions, another search space. Read-only (no file, table, lock, row or study is created),
    so that such a study is one error before a sweep says anything. A storage or study that is
    not there yet, or cannot be read now, is left to `open_study`."""
    parsed = parse_url(url)
    if parsed.get_backend_name() == "sqlite" and not Path(parsed.database).expanduser().is_file():
        return
    if not _stamped(parsed):
        return
    storage = None
    try:
        try:
            storage = read_only_storage(url)
        except Exception as exc:  # noqa: BLE001 - a schema to upgrade: as open_storage says it
            if is_connection_error(exc):
                return
            raise UserError(f"cannot open the Optuna storage {mask(url)}: {root_cause(exc)}") from None
        if spec.name not in optuna.get_all_study_names(storage):
            return
        check_directions(optuna.load_study(study_name=spec.name, storage=storage), spec)
        check_space(storage, spec)
    except UserError:
        raise
    except Exception:  # noqa: BLE001 - an outage: open_study waits it out
        return
    finally:
        if storage is not None:
            storage.engine.dispose()


def _stamped(parsed: URL) -> bool:
    """Optuna's tables are there with their version rows: opening the storage then writes
    nothing (else it would write them, racing a process that creates them under its lock)."""
    engine = sqlalchemy.create_engine(with_psycopg2(parsed.render_as_string(hide_password=False)),
                                      poolclass=sqlalchemy.pool.NullPool, **engine_kwargs(parsed))
    try:
        with engine.connect() as conn:
            return all(conn.execute(sqlalchemy.text(f"SELECT count(*) FROM {table}")).scalar()
                       for table in ("version_info", "alembic_version"))
    except Exception:  # noqa: BLE001 - no such table yet, or no answer: not stamped here
        return False
    finally:
        engine.dispose()

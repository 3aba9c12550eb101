"""`vqlog best`: the study's best trial by its own objective, where to see it, and what it was."""

from __future__ import annotations

import argparse
import os

from vqlog.cli import STORAGE_HELP, TRACKING_HELP, add_debug, default_if_empty, url_arg


def best_command_parser(sub) -> None:
    p = sub.add_parser("best", help="print the study's best trial: params, value, run URL")
    p.add_argument("--study", type=default_if_empty,
                   help="study name (default: the storage's only study)")
    p.add_argument("--storage", default=None, type=url_arg, help=STORAGE_HELP)
    p.add_argument("--tracking-uri", default=None, type=url_arg, help=TRACKING_HELP)
    add_debug(p)
    p.set_defaults(func=best_command)


def best_command(args: argparse.Namespace) -> int:
    from vqlog.errors import UserError
    from vqlog.study.storage import load_existing_study
    from vqlog.tracking.lineage import RUN_ID
    from vqlog.study.worker import best_trial
    from vqlog.tracking.client import resolve_tracking_uri
    from vqlog.tracking.rows import run_name

    study = load_existing_study(args.storage, args.study)
    args.study = study.study_name  # given, or the storage's only one
    best = best_trial(study)
    if best is None:
        raise UserError(f"study '{args.study}' has no COMPLETE trial yet")
    run_id = best.user_attrs.get(RUN_ID)
    # Before the first line: a --tracking-uri that cannot work is one Error line, not an answer
    # followed by one.
    link = _run_link(resolve_tracking_uri(args.tracking_uri), args.study, run_id) if run_id else None
    names = study.metric_names or [f"value {i}" for i in range(len(best.values))]
    values = "  ".join(f"{name} {value:.4g}" for name, value in zip(names, best.values))
    print(f"best: {run_name(best.number)} (trial {best.number})  {values}")
    for key, value in best.params.items():
        if isinstance(value, bool):  # BN: yes or no, as a spec and --set write it
            value = "yes" if value else "no"
        # every digit: `--set lr=...` pasted from here trains the trial's own configuration
        print(f"  {key} = {value!r}" if isinstance(value, float) else f"  {key} = {value}")
    if link:
        print(f"run:  {link}")
    return 0


def _run_link(uri: str, study: str, run_id: str) -> str:
    """The run's page in the MLflow UI (through `vqlog ui` for a local store), or its id and why
    there is no page: the study's answer stands without its tracking store."""
    from vqlog.tracking.client import MissingStore, StoreUnreachable, existing_store, open_client
    from vqlog.tracking.lineage import UI_URL_ENV, ui_link
    from vqlog.urls import mask

    try:
        store = existing_store(uri)
    except MissingStore:
        return f"{run_id} (no MLflow store at {mask(uri)})"
    except StoreUnreachable:  # a server that is down: the link would not open now anyway
        return f"{run_id} (MLflow at {mask(uri)} does not answer)"
    from mlflow.exceptions import MlflowException

    client = open_client(store)
    exp = client.get_experiment_by_name(study)
    if exp is None:
        return f"{run_id} (no MLflow experiment '{study}' at {mask(uri)})"
    import shlex

    from vqlog.commands.sweep import password_note
    from vqlog.urls import with_psycopg2, without_password

    # the mlflow command reads the store from MLFLOW_TRACKING_URI (it has no flag for it); a
    # line to paste: quoted, and with no password (libpq reads $PGPASSWORD), not a masked one
    cli = "mlflow" if uri == "sqlite:///mlflow.db" else \
        f"MLFLOW_TRACKING_URI={shlex.quote(with_psycopg2(without_password(uri)))} mlflow"
    note = password_note(uri).strip()  # where the password left out goes, if there was one
    note = f" {note}" if note else ""
    if exp.lifecycle_stage == "deleted":  # its page would open on an error
        return (f"{run_id} (the MLflow experiment '{study}' is deleted; restore it with "
                f"`{cli} experiments restore --experiment-id {exp.experiment_id}`{note})")
    try:
        deleted = client.get_run(run_id).info.lifecycle_stage == "deleted"
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        return f"{run_id} (no such run at {mask(uri)} any more: deleted for good)"
    if deleted:
        return (f"{run_id} (deleted in MLflow; restore it with `{cli} runs restore --run-id "
                f"{run_id}`{note})")
    link = ui_link(uri, exp.experiment_id, run_id)
    if uri.lower().startswith(("http://", "https://")) or os.environ.get(UI_URL_ENV, "").strip():
        return link  # a server that serves it already
    from vqlog.cli import command_name

    return (f"{link}   (once `{command_name('vqlog')} ui --tracking-uri "
            f"{shlex.quote(without_password(uri))}` serves it)")

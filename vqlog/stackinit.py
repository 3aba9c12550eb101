"""`python -m vqlog.stackinit`: prepare a shared study once, before any sweep worker starts.

The compose stack's one-shot `init` service (and the native stack test) run this. It creates the
Optuna schema and study (the spec's directions) and the MLflow experiment with its study run, so
workers that start together only load them: concurrent first-time creation races in both
libraries (Optuna's schema, optuna/optuna#820; MLflow's experiment, mlflow/mlflow#4123).
Running it again is harmless: everything is loaded if it exists.

    python -m vqlog.stackinit --config seed --storage postgresql://vqlog@postgres:5432/optuna \\
        --tracking-uri http://mlflow:5000
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Sequence


def init_study(spec, storage_url: str, tracking_uri: str):
    """The Optuna study and the MLflow experiment + study run for `spec`; returns (study, tracker).

    Rows to enqueue are left to the first worker: `sweep.run` enqueues them once, under the
    study lock, and marks the study so no later worker repeats them.
    """
    import optuna

    from vqlog import storage as storage_mod
    from vqlog import sweep, tracking

    sweep.quiet_optuna()
    storage = storage_mod.open_storage(storage_url)  # creates the Optuna schema
    with storage_mod.StudyLock(storage_url, spec.name):
        study = optuna.create_study(storage=storage, study_name=spec.name,
                                    directions=spec.directions, load_if_exists=True)
    sweep._check_directions(study, spec)
    tracker = tracking.Tracker(tracking_uri)
    tracker.start_study(study, spec)
    return study, tracker


def cmd_init(args: argparse.Namespace) -> int:
    from vqlog import tracking
    from vqlog.spec import load_sweep
    from vqlog.storage import mask

    spec = load_sweep(args.config)
    if args.study:
        spec = dataclasses.replace(spec, name=args.study)
    uri = args.tracking_uri or tracking.DEFAULT_TRACKING_URI
    study, tracker = init_study(spec, args.storage, uri)
    print(f"study {spec.name}: Optuna study ready in {mask(args.storage)} "
          f"({len(study.get_trials(deepcopy=False))} trials so far); MLflow experiment "
          f"{tracker.experiment_id}, study run {tracker.parent_id} at {mask(uri)}", flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from vqlog.cli import DEFAULT_SPEC, DEFAULT_STORAGE, _Parser

    p = _Parser(prog="python -m vqlog.stackinit",
                description="Create the Optuna study and the MLflow experiment before workers start.")
    p.add_argument("--config", default=DEFAULT_SPEC,
                   help=f"sweep spec: a YAML file or a bundled name (default {DEFAULT_SPEC})")
    p.add_argument("--study", help="study name (default: the spec's name)")
    p.add_argument("--storage", default=DEFAULT_STORAGE, help="Optuna storage URL")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from vqlog.cli import run

    args = build_parser().parse_args(argv)
    return run(cmd_init, args)


if __name__ == "__main__":
    raise SystemExit(main())

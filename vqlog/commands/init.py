"""`vqlog init`: prepare a shared study once, before any sweep worker starts.

The compose stack's one-shot `init` service (and the native stack test) run this. It creates the
Optuna schema and study (the spec's directions, its enqueued rows) and the MLflow experiment with
its study run, so workers that start together only load them, and a bad spec or an unreachable
store is one error before any of them starts. (Workers started without it are safe too: each
first-time creation, which races in both libraries, optuna/optuna#820 and mlflow/mlflow#4123, is
done under a lock they share.) Running it again is harmless: everything is loaded if it exists.

    vqlog init --config seed --storage postgresql://vqlog@postgres:5432/optuna \\
        --tracking-uri http://mlflow:5000
"""

from __future__ import annotations

import argparse

from vqlog.cli import add_debug, add_study_args


def init_command_parser(sub) -> None:
    p = sub.add_parser("init", help="create the Optuna study and the MLflow experiment before "
                                    "workers start")
    add_study_args(p)
    add_debug(p)
    p.set_defaults(func=init_command)


def init_command(args: argparse.Namespace) -> int:
    from vqlog.api import check_environment, prepare, study_spec
    from vqlog.study.existing import check_study
    from vqlog.study.storage import StudyLock, open_study
    from vqlog.urls import mask

    check_environment()  # as a sweep's: its heartbeat variables make the study's storage
    spec = study_spec(args.config, args.study)
    storage, tracker = prepare(spec, args.storage, args.tracking_uri)  # checked, as a sweep's
    tracker.check_experiment(spec.name)
    # other directions or space, an experiment of another study's: an Error, no lock file left
    check_study(spec, storage, tracker)
    study, _ = open_study(spec, storage)
    with StudyLock(storage, spec.name):  # as a worker does: one study run, whoever is first
        tracker.start_study(study, spec)
    from optuna.trial import TrialState

    states = [t.state for t in study.get_trials(deepcopy=False)]
    done = sum(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in states)
    queued = states.count(TrialState.WAITING)  # the spec's rows, or retries
    print(f"study {spec.name}: Optuna study ready in {mask(storage)} "
          f"({done} finished trial{'s' * (done != 1)} so far"
          f"{f', {queued} queued' if queued else ''}); MLflow experiment "
          f"{tracker.experiment_id}, study run {tracker.parent_id} at {mask(tracker.given_uri)}",
          flush=True)
    return 0
